"""Preprocessing for serving and for training's evaluation, from a package's ``preprocess.json``:
decode within the image limits, resize the shorter side, centre-crop, scale and normalise, HWC -> CHW
float32, with OpenCV and numpy alone, so a server never imports torch or albumentations. Training's
evaluation transform (``thali.core.training.transforms.eval_transform``) is this class, so what a model
is evaluated on and what it is served are one code path.

Phone photos: a 12 MP JPEG is decoded at the smallest DCT scale that keeps its shorter side at least
:data:`DRAFT_MARGIN` times the resize target, and any resize that shrinks by more than 2x averages
(``INTER_AREA``) instead of sampling with the model's interpolation, which would alias texture the model
never saw in training. An image that shrinks by 2x or less (every web-size photo) is resized exactly as
before, with the model's interpolation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from thali.core.errors import DataError, ImageTooLargeError
from thali.core.images import DEFAULT_CROP_PCT, DEFAULT_LIMITS, ImageLimits, decode_rgb, interpolation_flag

#: a JPEG is decoded at a DCT scale that keeps the shorter side at least this many times the target
DRAFT_MARGIN = 2
#: a resize that shrinks by more than this factor averages (cv2.INTER_AREA) instead of interpolating
ANTIALIAS_ABOVE = 2.0


def resize_shorter(rgb: np.ndarray, shorter: int, interpolation: int) -> np.ndarray:
    """``rgb`` with its shorter side resized to ``shorter`` (aspect kept; rounded like albumentations'
    ``SmallestMaxSize``): with ``interpolation`` up to a 2x shrink, averaged (area) beyond."""
    h, w = rgb.shape[:2]
    scale = shorter / float(min(h, w))
    if scale == 1.0:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
    flag = cv2.INTER_AREA if scale * ANTIALIAS_ABOVE < 1.0 else interpolation
    return cv2.resize(rgb, size, interpolation=flag)


def decode_resized(
    source: bytes | str | Path, shorter: int, interpolation: int, limits: ImageLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decode (within ``limits``, EXIF orientation applied; a JPEG at the DCT scale that keeps
    :data:`DRAFT_MARGIN` x ``shorter``) and resize the shorter side to ``shorter``: the one function
    serving and evaluation both call."""
    rgb = decode_rgb(source, limits, keep_shorter=DRAFT_MARGIN * shorter)
    return resize_shorter(rgb, shorter, interpolation)


class Preprocessor:
    """``preprocessor(image_bytes_or_rgb_array) -> (3, H, W) float32``; ``crop(...)`` gives the RGB
    crop the model sees (for heatmap overlays)."""

    def __init__(self, spec: Mapping[str, Any], limits: ImageLimits = DEFAULT_LIMITS) -> None:
        try:
            _, self.height, self.width = (int(v) for v in spec["input_size"])
            crop_pct = float(spec.get("crop_pct") or DEFAULT_CROP_PCT)
            default_side = round(min(self.height, self.width) / crop_pct)
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
        # the normalised value of every uint8 level, per channel: a lookup instead of a subtraction and
        # a multiplication over the whole crop (the same float32 values, half the time)
        levels = np.arange(256, dtype=np.float32)[:, None]
        self._lut = [np.ascontiguousarray(col) for col in ((levels - self.mean) * self.inv_std).T]
        self.limits = limits

    def decode(self, source: bytes | str | Path, limits: ImageLimits | None = None) -> np.ndarray:
        """An encoded image (bytes or a file) decoded and resized to the shorter side (not cropped)."""
        return decode_resized(source, self.shorter, self.interpolation, limits or self.limits)

    def crop(self, image: bytes | np.ndarray) -> np.ndarray:
        """The resized, centre-cropped RGB uint8 image (H, W, 3)."""
        if isinstance(image, bytes | bytearray):
            rgb = self.decode(bytes(image))
        else:
            h, w = image.shape[:2]
            if min(h, w) < 1 or max(h, w) / min(h, w) > self.limits.max_aspect:  # arrays skip decode_rgb
                raise ImageTooLargeError(
                    f"image is {w} x {h} pixels: an aspect ratio over the limit of "
                    f"{self.limits.max_aspect:g}:1"
                )
            rgb = resize_shorter(image, self.shorter, self.interpolation)
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
        """``(crop - mean) / std`` of a uint8 (H, W, 3) crop as float32 (3, H, W)."""
        if crop.dtype != np.uint8:
            x = (crop.astype(np.float32) - self.mean) * self.inv_std
            return np.ascontiguousarray(x.transpose(2, 0, 1))
        out = np.empty((3, *crop.shape[:2]), dtype=np.float32)
        for channel, lut in enumerate(self._lut):
            np.take(lut, crop[:, :, channel], out=out[channel])
        return out
