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

# A feedback label must be a class of the domain; no spec shared by every domain can list the classes
# (the test's domains, tiny and duo, both have red, green and blue). A label that is a valid string is
# made one of them, so generated requests reach the store; wrong types and lengths stay as generated.
FEEDBACK_LABELS = ["red", "green", "blue", "none_of_these"]


@schemathesis.hook.apply_to(name="POST /v1/domains/{domain}/feedback")
def map_body(ctx: object, body: object) -> object:
    if isinstance(body, dict):
        label = body.get("label")
        if isinstance(label, str) and 1 <= len(label) <= 100:
            body["label"] = FEEDBACK_LABELS[sum(label.encode()) % len(FEEDBACK_LABELS)]
        if "image" in body and "image_sha256" in body:  # the spec allows either; the server wants one
            del body["image_sha256"]
    return body
