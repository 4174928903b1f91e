"""The evaluation transform training used before serving's preprocessor became it: the reference the
parity tests hold both to."""

from __future__ import annotations

from typing import Any

from thali.core.images import interpolation_flag


def reference_eval(preprocess: dict[str, Any]) -> Any:
    """Training's evaluation transform as it was before it became the serving preprocessor
    (albumentations ``SmallestMaxSize`` + ``CenterCrop`` + ``Normalize``): the tensors to keep."""
    import albumentations as A

    _, h, w = preprocess["input_size"]
    resize = round(min(h, w) / float(preprocess.get("crop_pct", 0.875)))
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=resize, interpolation=interpolation_flag(preprocess["interpolation"])),
            A.CenterCrop(height=h, width=w),
            A.Normalize(mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]), max_pixel_value=255.0),
        ]
    )
