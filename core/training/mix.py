"""Batch-level mixup and cutmix, producing soft targets; randomness from an explicit generator."""

from __future__ import annotations

import numpy as np
import torch

from thali.core.config import AugmentationConfig


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    aug: AugmentationConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images and targets: class indices ``(N,)`` for an unmixed batch, an ``(N, num_classes)``
    probability matrix for a mixed one (what ``thali_register_losses`` promises a loss).

    With both alphas set, each mixed batch is mixup or cutmix with equal chance.
    """
    use_mixup, use_cutmix = aug.mixup_alpha > 0, aug.cutmix_alpha > 0
    rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    if not (use_mixup or use_cutmix) or rng.random() > aug.mix_prob or images.shape[0] < 2:
        return images, labels
    target = torch.nn.functional.one_hot(labels, num_classes).float()
    perm = torch.from_numpy(rng.permutation(images.shape[0]))
    cutmix = use_cutmix and (not use_mixup or rng.random() < 0.5)
    alpha = aug.cutmix_alpha if cutmix else aug.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if cutmix:
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        images = images * lam + images[perm] * (1.0 - lam)
    return images, target * lam + target[perm] * (1.0 - lam)
