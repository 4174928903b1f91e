"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=schemathesis_hooks``): which bytes are an image. The spec says
a part is ``image/jpeg``, ``image/png`` … and a JSON image is base64 (``format: byte``); no schema can say
that the bytes must decode, so these strategies give schemathesis real images of those types (made
here, a few pixels each) where it would send random bytes. Everything else it generates from the spec."""

from __future__ import annotations

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _image(kind: str, colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, kind)
    return buffer.getvalue()


COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 200)]
SIZES = [(8, 8), (40, 30), (30, 40)]
IMAGES = {
    kind: [_image(name, c, s) for c in COLOURS for s in SIZES]
    for kind, name in {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF",
                       "image/bmp": "BMP", "image/tiff": "TIFF"}.items()
}  # fmt: skip

for media_type, images in IMAGES.items():
    schemathesis.openapi.media_type(media_type, st.sampled_from(images))
schemathesis.openapi.format(
    "byte",
    st.sampled_from([base64.b64encode(i).decode() for i in IMAGES["image/jpeg"] + IMAGES["image/png"]]),
)
