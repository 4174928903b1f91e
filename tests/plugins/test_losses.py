from __future__ import annotations

import pytest

from thali.core import ConfigError, build_plugin_manager

LOSSES = build_plugin_manager(autoload=False).registries.losses


def test_cross_entropy_matches_torch_with_smoothing() -> None:
    import torch
    import torch.nn.functional as F

    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ours = LOSSES.create("cross_entropy", 5, label_smoothing=0.1)(logits, target)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, label_smoothing=0.1))


def test_soft_targets_equal_hard_targets_when_one_hot() -> None:
    import torch
    import torch.nn.functional as F

    logits, target = torch.randn(6, 4), torch.randint(0, 4, (6,))
    for name in ("cross_entropy", "focal"):
        loss = LOSSES.create(name, 4)
        torch.testing.assert_close(loss(logits, target), loss(logits, F.one_hot(target, 4).float()))


def test_focal_down_weights_easy_examples() -> None:
    import torch

    easy = torch.tensor([[6.0, 0.0, 0.0]])
    hard = torch.tensor([[0.5, 0.0, 0.0]])
    target = torch.tensor([0])
    ce, fl = LOSSES.create("cross_entropy", 3), LOSSES.create("focal", 3, gamma=2.0)
    assert fl(easy, target) / ce(easy, target) < fl(hard, target) / ce(hard, target) < 1.0
    assert torch.isclose(LOSSES.create("focal", 3, gamma=0.0)(hard, target), ce(hard, target))


def test_class_balanced_weights_rare_classes_up() -> None:
    import torch

    loss = LOSSES.create("class_balanced", 2, class_counts=[1000, 10], beta=0.999)
    assert loss.weight[1] > loss.weight[0]
    same_logits = torch.zeros(1, 2)
    assert loss(same_logits, torch.tensor([1])) > loss(same_logits, torch.tensor([0]))
    logits = torch.zeros(1, 2, requires_grad=True)
    loss(logits, torch.tensor([1])).backward()
    assert logits.grad is not None
    with pytest.raises(ConfigError, match="needs the training images per class"):
        LOSSES.create("class_balanced", 2)
