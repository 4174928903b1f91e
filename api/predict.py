"""``POST /v1/domains/{domain}/predict`` and ``/predict/batch``: images as multipart uploads or base64
JSON; answers with top-k labels, calibrated probabilities, the unknown flag and timings."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import ValidationError

from thali.core.images import accepted_formats, accepted_media_types

from .bodies import SafeParser, part_bytes
from .errors import ApiError
from .schemas import (
    BatchJSONSchema,
    BatchResponseSchema,
    BatchUploadSchema,
    ErrorBodySchema,
    PredictionSchema,
    PredictJSONSchema,
    PredictQuerySchema,
    UploadSchema,
)
from .service import service

blp = Blueprint("predict", __name__, url_prefix="/v1/domains", description="Classify images")
blp.ARGUMENTS_PARSER = SafeParser()

ERRORS = {
    400: "not a readable image (corrupt or truncated)",
    404: "unknown domain",
    413: "image or request too large (bytes or pixels)",
    409: "explain=true for a model that cannot explain (no heatmap output)",
    415: f"not an image of an accepted format ({', '.join(accepted_formats())}), or a body that is "
    "neither multipart nor JSON",
    422: "wrong fields, top_k out of range, bad base64, several images on single predict",
    503: "domain failed to load, or the server is overloaded",
}


def wrong(message: str, errors: dict[str, Any] | None = None) -> ApiError:
    return ApiError(422, "unprocessable_entity", message, errors)


def too_large(message: str, errors: dict[str, Any] | None = None) -> ApiError:
    return ApiError(413, "payload_too_large", message, errors)


def unsupported(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


#: what a part may be: the formats the decoder takes (the server reads the bytes, not the part's type)
IMAGE_TYPES = ", ".join(accepted_media_types())


def _body_doc(json_schema: type, upload_schema: type, field: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": upload_schema,
                    "encoding": {field: {"contentType": IMAGE_TYPES}},
                },
                "application/json": {"schema": json_schema},
            },
        }
    }


def _decode_b64(text: Any, field: str, limit: int) -> bytes:
    if not isinstance(text, str):
        raise ApiError(
            422, "unprocessable_entity", f"{field}: expected a base64 string", errors={field: "not a string"}
        )
    if len(text) // 4 * 3 > limit + 3:  # checked before decoding: the decoded bytes are never made
        raise too_large(f"{field} is over the limit of {limit:,} bytes", {field: "too large"})
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            422, "unprocessable_entity", f"{field}: not valid base64", errors={field: "not valid base64"}
        ) from None


def _check_count(count: int, many: bool, field: str) -> None:
    limit = service().settings.max_batch_images
    if many and count > limit:
        raise too_large(f"{count} images in one request; the limit is {limit}", {field: f"at most {limit}"})


def _read_body(many: bool) -> tuple[list[bytes], dict[str, Any]]:
    """(image bytes, options from a JSON body) from a multipart upload or a base64 JSON body."""
    settings = service().settings
    field = "images" if many else "image"
    if request.mimetype == "multipart/form-data":
        # file parts, and parts sent without a file name (form fields, kept as bytes)
        uploads = request.files.getlist(field) + request.form.getlist(field)
        if not uploads:
            raise ApiError(
                422,
                "unprocessable_entity",
                f"multipart field {field!r} is missing",
                errors={field: "missing"},
            )
        if not many and len(uploads) > 1:
            raise wrong(
                f"{len(uploads)} {field!r} parts: this endpoint classifies one image; send several to "
                "/predict/batch (field 'images')",
                {field: "exactly one"},
            )
        _check_count(len(uploads), many, field)  # before any part is read
        images = [
            part_bytes(u)[: settings.max_upload_bytes + 1]
            if isinstance(u, str)
            else u.stream.read(settings.max_upload_bytes + 1)
            for u in uploads
        ]
        options: dict[str, Any] = {}
    elif request.mimetype == "application/json":
        schema = BatchJSONSchema() if many else PredictJSONSchema()
        try:
            data = schema.load(request.get_json(silent=False))
        except ValidationError as exc:
            errors = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
            raise ApiError(
                422,
                "unprocessable_entity",
                "the request has invalid fields: " + ", ".join(errors),
                errors=errors,
            ) from None
        texts = data["images"] if many else [data["image"]]
        _check_count(len(texts), many, field)
        limit = settings.max_upload_bytes
        images = [_decode_b64(t, f"{field}[{i}]" if many else field, limit) for i, t in enumerate(texts)]
        options = {k: data[k] for k in ("top_k", "explain") if k in data}
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data (field {field!r}) or JSON {{{field!r}: base64}}, "
            f"not {request.mimetype or 'an empty body'}",
        )
    for i, data in enumerate(images):
        if len(data) > settings.max_upload_bytes:
            raise ApiError(
                413,
                "payload_too_large",
                f"image {i} is over the limit of {settings.max_upload_bytes:,} bytes",
            )
    total = sum(len(data) for data in images)
    if total > settings.max_batch_bytes:
        raise too_large(
            f"the images are {total:,} bytes together, over the limit of {settings.max_batch_bytes:,}"
        )
    return images, options


def _answer(domain: str, many: bool, query: dict[str, Any]) -> list[dict[str, Any]]:
    images, options = _read_body(many)
    top_k = options.get("top_k", query.get("top_k"))
    explain = bool(options.get("explain", query.get("explain", False)))
    return service().hosting.predict(domain, images, top_k, explain)  # image errors carry 400/413/415


def _document(view: Any) -> Any:
    for status, description in ERRORS.items():
        view = blp.alt_response(status, schema=ErrorBodySchema, description=description)(view)
    return view


@blp.route("/<name:domain>/predict")
class Predict(MethodView):
    @blp.arguments(PredictQuerySchema, location="query")
    @blp.response(200, PredictionSchema)
    @blp.doc(**_body_doc(PredictJSONSchema, UploadSchema, "image"))
    @_document
    def post(self, query: dict[str, Any], domain: str) -> dict[str, Any]:
        """Classify one image (multipart field `image`, or JSON `{"image": base64}`)"""
        return _answer(domain, False, query)[0]


@blp.route("/<name:domain>/predict/batch")
class PredictBatch(MethodView):
    @blp.arguments(PredictQuerySchema, location="query")
    @blp.response(200, BatchResponseSchema)
    @blp.doc(**_body_doc(BatchJSONSchema, BatchUploadSchema, "images"))
    @_document
    def post(self, query: dict[str, Any], domain: str) -> dict[str, Any]:
        """Classify several images in one request (multipart fields `images`, or JSON `{"images": [...]}`)"""
        return {"results": _answer(domain, True, query)}
