"""Image transforms: training augmentation from config (albumentations), evaluation from the backbone's
preprocessing metadata (resize shorter side to size / crop_pct, centre crop, normalise) through the
serving preprocessor."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from thali.core.config import AugmentationConfig
from thali.core.images import DEFAULT_LIMITS, ImageLimits, interpolation_flag


def _size(preprocess: Mapping[str, Any]) -> tuple[int, int]:
    _, h, w = preprocess["input_size"]
    return int(h), int(w)


class EvalTransform:
    """Training's evaluation transform: the serving :class:`~thali.core.inference.Preprocessor` (resize
    the shorter side to size / crop_pct, centre crop, normalise) with a torch tensor out.
    :class:`~thali.core.training.data.ImageDataset` decodes through :meth:`decode`, so a phone photo is
    decoded at reduced JPEG scale and downscaled with averaging exactly as the server does: what a model
    is evaluated, gated and calibrated on is what it is served. (It replaced albumentations'
    ``SmallestMaxSize`` + ``CenterCrop`` + ``Normalize``, which gave the same tensors on photos that
    shrink by 2x or less: ``tests/core/inference/test_preprocess_parity.py``.)"""

    def __init__(self, preprocess: Mapping[str, Any]) -> None:
        from thali.core.inference.preprocess import Preprocessor

        # the backbone's metadata is a preprocess spec already: resize to size / crop_pct, its
        # interpolation, mean and std
        self.preprocessor = Preprocessor(preprocess)

    def decode(self, path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
        """The image file decoded and resized to the shorter side, as the server decodes uploads."""
        return self.preprocessor.decode(path, limits)

    def __call__(self, *, image: np.ndarray) -> dict[str, Any]:
        import torch

        return {"image": torch.from_numpy(self.preprocessor(image))}


def eval_transform(preprocess: Mapping[str, Any]) -> EvalTransform:
    """The evaluation transform for a backbone's preprocessing metadata (see :class:`EvalTransform`)."""
    return EvalTransform(preprocess)


def train_transform(aug: AugmentationConfig, preprocess: Mapping[str, Any], seed: int | None = None) -> Any:
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    h, w = _size(preprocess)
    interp = interpolation_flag(preprocess.get("interpolation", "bilinear"))
    steps: list[Any] = [
        A.RandomResizedCrop(size=(h, w), scale=tuple(aug.random_resized_crop_scale), interpolation=interp)
    ]
    if aug.horizontal_flip:
        steps.append(A.HorizontalFlip(p=aug.horizontal_flip))
    if aug.vertical_flip:
        steps.append(A.VerticalFlip(p=aug.vertical_flip))
    if aug.rotate_degrees:
        steps.append(A.Rotate(limit=aug.rotate_degrees, border_mode=cv2.BORDER_REFLECT_101, p=0.5))
    if aug.brightness_contrast:
        b = aug.brightness_contrast
        steps.append(A.RandomBrightnessContrast(brightness_limit=b, contrast_limit=b, p=0.5))
    if aug.color_jitter:
        c = aug.color_jitter
        steps.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(0.5, c / 4), p=0.5))
    # Capture degradations, in the order a camera makes them: optics (blur), sensor (noise), encoder (JPEG).
    if aug.blur:
        steps.append(
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2)),
                    A.Defocus(radius=(1, 3), alias_blur=(0.1, 0.3)),
                    A.MotionBlur(blur_limit=(3, 5)),
                ],
                p=aug.blur,
            )
        )
    if aug.noise:
        steps.append(
            A.OneOf(
                [
                    A.GaussNoise(std_range=(0.02, 0.06)),  # fraction of 255: sd about 5-15 levels
                    A.ISONoise(color_shift=(0.01, 0.04), intensity=(0.1, 0.3)),
                ],
                p=aug.noise,
            )
        )
    if aug.jpeg_quality is not None and aug.jpeg_prob:
        steps.append(
            A.ImageCompression(
                compression_type="jpeg", quality_range=tuple(aug.jpeg_quality), p=aug.jpeg_prob
            )
        )
    steps.append(
        A.Normalize(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]), max_pixel_value=255.0)
    )
    if aug.random_erasing:
        # after normalisation, so fill 0 is the dataset mean colour (as torchvision's RandomErasing)
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 3),
                hole_height_range=(0.1, 0.25),
                hole_width_range=(0.1, 0.25),
                fill=0,
                p=aug.random_erasing,
            )
        )
    steps.append(ToTensorV2())
    return A.Compose(steps, seed=seed)
