"""Decoding untrusted images with limits: a file-size cap and a pixel cap, checked before decoding.

A 172 KB PNG can declare 13,300 x 13,300 pixels and take 3.3 GB to decode. Every place that decodes an
image (dataset scan, training, evaluation, export, serving) goes through :func:`check_header` or
:func:`decode_rgb`, so such a file is refused from its header, before any pixel is decoded, with a
:class:`DataError` that callers report and skip like any broken file. No torch here.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BrokenImageError, ImageTooLargeError, NotAnImageError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above every phone camera; 5x below a 13k x 13k bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """The caps applied before an image is decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


DEFAULT_LIMITS = ImageLimits()


def _open(source: str | Path | bytes, limits: ImageLimits) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes | bytearray):
        size = len(source)
        stream: Any = io.BytesIO(source)
    else:
        size = os.stat(source).st_size
        stream = source
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"image is {size:,} bytes, over the limit of {limits.max_bytes:,}")
    if size == 0:
        raise NotAnImageError("image is empty (0 bytes)")
    with warnings.catch_warnings():  # our own cap below decides; Pillow's hard stop (2x its limit) stays
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise NotAnImageError("not an image (cannot identify image file)") from None
    pixels = img.width * img.height
    if pixels > limits.max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"image is {img.width} x {img.height} = {pixels:,} pixels, over the limit of "
            f"{limits.max_pixels:,} (a decompression bomb, or a photo to downscale first)"
        )
    return img


def check_header(source: str | Path | bytes, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """Check size, pixel count and the decoder's own consistency check without decoding; (w, h)."""
    img = _open(source, limits)
    with img:
        size = img.size
        img.verify()
    return size


def decode_rgb(source: str | Path | bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Any:
    """Decode to an RGB uint8 numpy array (EXIF orientation applied, transparency over white), within
    limits."""
    import numpy as np
    from PIL import Image, ImageOps

    with _open(source, limits) as img:
        try:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated, corrupt, odd modes
            raise BrokenImageError(f"image could not be decoded ({type(exc).__name__}: {exc})") from None
