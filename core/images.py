"""Decoding untrusted images with limits: a file-size cap and a pixel cap, checked before decoding.

A 172 KB PNG can declare 13,300 x 13,300 pixels and take 3.3 GB to decode. Every place that decodes an
image (dataset scan, training, evaluation, export, serving) goes through :func:`check_header` or
:func:`decode_rgb`, so such a file is refused from its header, before any pixel is decoded, with a
:class:`DataError` that callers report and skip like any broken file. No torch here.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BrokenImageError, DataError, ImageTooLargeError, NotAnImageError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: above every phone camera; 5x below a 13k x 13k bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: longer side over shorter side: panoramas reach ~8:1; an 8000 x 1 PNG of 107 bytes would ask the
#: resize for 256 x 2 million pixels (1.6 GB)
DEFAULT_MAX_ASPECT = 20.0
#: scans of one JPEG: encoders write 1 (baseline) to ~15 (progressive); each scan re-reads the whole
#: coefficient buffer, so a 500 KB file that repeats a tiny scan 20,000 times costs 15 s of CPU
DEFAULT_MAX_JPEG_SCANS = 100
#: the formats people send, as Pillow names them, with their file suffixes and media types; the other
#: decoders Pillow has (PPM, IM, DDS, JPEG 2000, PSD ...) are attack surface nobody needs here. HEIF
#: (iPhones' default, through pillow-heif) and AVIF count only where their decoder is installed:
#: :func:`accepted_formats` says which are.
FORMAT_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "JPEG": (("jpg", "jpeg"), ("image/jpeg",)),
    "PNG": (("png",), ("image/png",)),
    "WEBP": (("webp",), ("image/webp",)),
    "HEIF": (("heic", "heif"), ("image/heic", "image/heif")),
    "AVIF": (("avif",), ("image/avif",)),
    "GIF": (("gif",), ("image/gif",)),
    "BMP": (("bmp",), ("image/bmp",)),
    "TIFF": (("tif", "tiff"), ("image/tiff",)),
}
FORMATS = tuple(FORMAT_TYPES)  # what the decoder is asked for; accepted_formats() says what it can do


#: resampling by the names backbones declare (timm's ``interpolation``), as OpenCV flags: the one table
#: that training's albumentations transforms and the server's OpenCV preprocessing both read, so a model
#: is served with the resampling it was trained with (two tables had drifted: ``lanczos`` trained bilinear
#: and served Lanczos)
INTERPOLATION = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3, "lanczos": 4}
#: the share of the resized shorter side the centre crop keeps when a backbone declares none (timm's and
#: torchvision's ImageNet evaluation default): resize to ``size / 0.875``, crop ``size``
DEFAULT_CROP_PCT = 0.875


def interpolation_flag(name: object) -> int:
    """OpenCV's flag for a declared interpolation (``cv2.INTER_*``); a name outside
    :data:`INTERPOLATION` is a :class:`DataError`, not a silent bilinear."""
    flag = INTERPOLATION.get(str(name))
    if flag is None:
        raise DataError(f"interpolation {name!r} is not one of {', '.join(INTERPOLATION)}")
    return flag


@dataclass(frozen=True)
class ImageLimits:
    """The caps applied before an image is decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS


DEFAULT_LIMITS = ImageLimits()


_decoders_checked: tuple[str, ...] | None = None


def accepted_formats() -> tuple[str, ...]:
    """The formats of :data:`FORMAT_TYPES` this installation decodes: HEIF once ``pillow-heif`` is
    registered with Pillow (done here, once), AVIF where Pillow was built with libavif."""
    global _decoders_checked
    if _decoders_checked is None:
        from PIL import Image, features

        try:
            import pillow_heif

            pillow_heif.register_heif_opener(thumbnails=False)
        except ImportError:
            pass
        Image.init()
        readable = set(Image.OPEN)
        if not features.check("avif"):
            readable.discard("AVIF")
        _decoders_checked = tuple(name for name in FORMAT_TYPES if name in readable)
    return _decoders_checked


def accepted_suffixes() -> list[str]:
    """File suffixes (no dot) of :func:`accepted_formats`, for upload widgets and folder scans."""
    return [suffix for name in accepted_formats() for suffix in FORMAT_TYPES[name][0]]


def accepted_media_types() -> list[str]:
    """Media types of :func:`accepted_formats` (``image/jpeg`` ...)."""
    return [kind for name in accepted_formats() for kind in FORMAT_TYPES[name][1]]


#: a marker inside entropy-coded data: FF and a byte other than 00 (stuffing), D0-D7 (RSTn), FF (fill)
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS segments) a JPEG holds, walking its marker segments; entropy-coded data is
    skipped to the next marker (``FF 00`` stuffing and ``RSTn`` are not markers). Linear in the bytes."""
    count, pos, end = 0, 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return count  # not a marker where one must be: the decoder will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return count
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker != 0xDA:
            continue
        count += 1
        # the scan's entropy-coded data runs to the next real marker (the search runs in C: a 3 MB
        # photo holds ~12,000 stuffed FF 00 pairs, which a Python loop took 5 ms to step over)
        found = _NEXT_MARKER.search(data, pos)
        if found is None:
            return count
        pos = found.start()
    return count


def _read(source: str | Path | bytes, limits: ImageLimits) -> bytes:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        size = os.stat(source).st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"image is {size:,} bytes, over the limit of {limits.max_bytes:,}")
        with open(source, "rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"image is {len(data):,} bytes, over the limit of {limits.max_bytes:,}")
    if not data:
        raise NotAnImageError("image is empty (0 bytes)")
    return data


def _open(source: str | Path | bytes, limits: ImageLimits) -> Any:
    """Open (not decode) an image of an accepted format within every limit checked from the header."""
    from PIL import Image, UnidentifiedImageError

    data = _read(source, limits)
    formats = accepted_formats()
    with warnings.catch_warnings():  # our own cap below decides; Pillow's hard stop (2x its limit) stays
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise NotAnImageError(
                f"not an image (cannot identify image file; accepted formats: {', '.join(formats)})"
            ) from None
        except Exception as exc:  # a header that starts right and then breaks: any of a dozen errors
            raise _broken(exc) from None
    try:
        _check_header(img, data, limits)
    except BaseException:
        img.close()
        raise
    return img


def _check_header(img: Any, data: bytes, limits: ImageLimits) -> None:
    width, height = img.size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width} x {height} = {pixels:,} pixels, over the limit of "
            f"{limits.max_pixels:,} (a decompression bomb, or a photo to downscale first)"
        )
    if min(width, height) < 1:
        raise BrokenImageError(f"image is {width} x {height} pixels")
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise ImageTooLargeError(
            f"image is {width} x {height} pixels: an aspect ratio over the limit of "
            f"{limits.max_aspect:g}:1 (crop it to the subject)"
        )
    if img.format == "JPEG":
        scans = jpeg_scans(data)
        if scans > limits.max_jpeg_scans:
            raise ImageTooLargeError(
                f"JPEG holds {scans:,} scans, over the limit of {limits.max_jpeg_scans} (encoders write "
                "at most ~15; re-save the photo)"
            )


def _broken(exc: BaseException) -> BrokenImageError:
    text = " ".join(str(exc).split())[:200]
    return BrokenImageError(f"image could not be decoded ({type(exc).__name__}: {text})")


def image_format(source: str | Path | bytes, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    """The format Pillow names an accepted image by (``JPEG``, ``HEIF`` ...), its header within limits."""
    with _open(source, limits) as img:
        return str(img.format)


def check_header(source: str | Path | bytes, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """Check size, pixel count and the decoder's own consistency check without decoding; (w, h)."""
    img = _open(source, limits)
    with img:
        size = img.size
        try:
            img.verify()
        except Exception as exc:
            raise _broken(exc) from None
    return size


def jpeg_draft_scale(width: int, height: int, keep_shorter: int) -> int:
    """The largest JPEG DCT scale denominator (8, 4 or 2; 1 for none) that decodes a ``width x height``
    JPEG with its shorter side still at least ``keep_shorter`` pixels."""
    for scale in (8, 4, 2):
        if min(width, height) // scale >= keep_shorter:
            return scale
    return 1


def decode_rgb(
    source: str | Path | bytes, limits: ImageLimits = DEFAULT_LIMITS, keep_shorter: int | None = None
) -> Any:
    """Decode to an RGB uint8 numpy array (EXIF orientation applied, transparency over white), within
    limits. With ``keep_shorter``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    its shorter side at least that many pixels (libjpeg scales in the frequency domain, which averages,
    and skips most of the work): a 12 MP phone photo meant for a 256 px resize decodes at 1/4 scale.
    Other formats, and JPEGs too small to halve, decode at full size."""
    import numpy as np
    from PIL import Image, ImageOps

    with _open(source, limits) as img:
        try:
            if keep_shorter and img.format == "JPEG":
                width, height = img.size
                scale = jpeg_draft_scale(width, height, keep_shorter)
                if scale > 1:
                    img.draft(None, (img.size[0] // scale, img.size[1] // scale))
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        except MemoryError:
            raise ImageTooLargeError("image needs more memory to decode than this process has") from None
        except Exception as exc:  # truncated, corrupt, odd modes: OSError, SyntaxError, struct.error ...
            raise _broken(exc) from None
