from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_tiny_domain

from thali.core import load_config
from thali.core.config import AugmentationConfig, ScheduleConfig
from thali.core.training.mix import mix_batch
from thali.core.training.optim import lr_factor
from thali.core.training.trainer import TrainOptions, train


@pytest.mark.parametrize("mode", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_mixed_targets_are_distributions(mode: dict[str, float]) -> None:
    import torch

    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 1])
    aug = AugmentationConfig(**mode, mix_prob=1.0)
    mixed, target = mix_batch(images, labels, 3, aug, torch.Generator().manual_seed(0))
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    assert (target.max(1).values < 1.0).any()
    again, _ = mix_batch(images, labels, 3, aug, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)  # reproducible from the generator


def test_schedules_warm_up_then_decay() -> None:
    cosine = ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.0)
    assert lr_factor(0, cosine, 10, 5, 1e-3) == pytest.approx(0.1)
    assert lr_factor(10, cosine, 10, 5, 1e-3) == pytest.approx(1.0)
    assert lr_factor(49, cosine, 10, 5, 1e-3) < 0.01
    step = ScheduleConfig(name="step", warmup_epochs=0, step_epochs=2, gamma=0.5)
    assert [lr_factor(s, step, 10, 6, 1e-3) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]


def test_sgd_step_accumulation_ema_and_bf16_train(
    tmp_path: Path, tiny_data: Path, registries: object
) -> None:
    import torch

    config = load_config(
        write_tiny_domain(tmp_path / "cfg"),
        [
            "optimizer.name=sgd",
            "optimizer.lr=0.05",
            "schedule.name=step",
            "schedule.step_epochs=1",
            "training.grad_accum_steps=2",
            "training.ema.enabled=true",
            "training.ema.decay=0.5",
            "training.mixed_precision=bf16",
            "loss.name=focal",
        ],
    )
    result = train(
        config, registries, TrainOptions(run_dir=tmp_path / "run", data=str(tiny_data), progress=False)
    )
    assert result["finished"]
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert "momentum_buffer" in next(iter(saved["optimizer"]["state"].values()))
    raw, ema = saved["model"]["fc.weight"], saved["ema"]["module"]["fc.weight"]
    assert not torch.equal(raw, ema) and saved["ema"]["updates"] > 0


def test_ema_warms_up_and_tracks_the_model() -> None:
    import torch

    from thali.core.training.optim import ModelEma

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEma(model, decay=0.998)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(200):
        ema.update(model)
    assert float(ema.module.weight[0, 0]) > 0.9  # a fixed 0.998 would give 1 - 0.998**200 = 0.33


def test_an_unmixed_batch_keeps_class_index_targets() -> None:
    """What thali_register_losses promises: indices, and a probability matrix only under mixup/cutmix."""
    import torch

    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    for aug in (AugmentationConfig(mix_prob=0.0, mixup_alpha=0.4), AugmentationConfig(mixup_alpha=0.0)):
        same, target = mix_batch(images, labels, 3, aug, torch.Generator().manual_seed(0))
        assert torch.equal(same, images) and torch.equal(target, labels)
