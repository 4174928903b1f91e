"""Preprocessing for serving, from a package's ``preprocess.json``: decode within the image limits,
resize the shorter side, centre-crop, scale and normalise, HWC -> CHW float32. It reproduces the
evaluation transform of training (albumentations ``SmallestMaxSize`` + ``CenterCrop`` + ``Normalize``)
with OpenCV and numpy alone, so a server never imports torch or albumentations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from thali.core.errors import DataError, ImageTooLargeError
from thali.core.images import DEFAULT_CROP_PCT, DEFAULT_LIMITS, ImageLimits, decode_rgb, interpolation_flag


class Preprocessor:
    """``preprocessor(image_bytes_or_rgb_array) -> (3, H, W) float32``; ``crop(...)`` gives the RGB
    crop the model sees (for heatmap overlays)."""

    def __init__(self, spec: Mapping[str, Any], limits: ImageLimits = DEFAULT_LIMITS) -> None:
        try:
            _, self.height, self.width = (int(v) for v in spec["input_size"])
            default_side = round(min(self.height, self.width) / DEFAULT_CROP_PCT)
            self.shorter = int(spec.get("resize_shorter_side") or default_side)
            self.interpolation = interpolation_flag(spec.get("interpolation", "bilinear"))
            scale = float(spec.get("pixel_scale", 255.0))
            mean = np.asarray(spec["mean"], dtype=np.float32) * scale
            std = np.asarray(spec["std"], dtype=np.float32) * scale
        except DataError as exc:
            raise DataError(f"preprocess.json: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"preprocess.json is not usable ({type(exc).__name__}: {exc})") from None
        if mean.shape != (3,) or std.shape != (3,) or not (std > 0).all():
            raise DataError("preprocess.json: mean and std need three values, std above zero")
        self.mean, self.inv_std = mean, (1.0 / std).astype(np.float32)
        self.limits = limits

    def crop(self, image: bytes | np.ndarray) -> np.ndarray:
        """The resized, centre-cropped RGB uint8 image (H, W, 3)."""
        rgb = decode_rgb(image, self.limits) if isinstance(image, bytes | bytearray) else image
        h, w = rgb.shape[:2]
        if min(h, w) < 1 or max(h, w) / min(h, w) > self.limits.max_aspect:  # arrays skip decode_rgb
            raise ImageTooLargeError(
                f"image is {w} x {h} pixels: an aspect ratio over the limit of {self.limits.max_aspect:g}:1"
            )
        scale = self.shorter / float(min(h, w))
        if scale != 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
            rgb = cv2.resize(rgb, size, interpolation=self.interpolation)
        h, w = rgb.shape[:2]
        if h < self.height or w < self.width:  # only for odd aspect ratios: pad like albumentations
            rgb = cv2.copyMakeBorder(
                rgb, 0, max(0, self.height - h), 0, max(0, self.width - w), cv2.BORDER_REFLECT_101
            )
            h, w = rgb.shape[:2]
        top, left = (h - self.height) // 2, (w - self.width) // 2
        return np.ascontiguousarray(rgb[top : top + self.height, left : left + self.width])

    def __call__(self, image: bytes | np.ndarray) -> np.ndarray:
        return self.normalise(self.crop(image))

    def normalise(self, crop: np.ndarray) -> np.ndarray:
        x = (crop.astype(np.float32) - self.mean) * self.inv_std
        return np.ascontiguousarray(x.transpose(2, 0, 1))
