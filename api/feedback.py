"""``POST /v1/domains/{domain}/feedback``: a person says what a photo really is (a class of the domain,
or ``none_of_these``); the server adds which model version and variant answered it and what it said,
and keeps photo and record in the feedback store (``THALI_FEEDBACK``; off unless set). ``GET`` lists the
corrections with counts per label, and serves a stored photo. With ``THALI_FEEDBACK_KEY`` set, every
feedback call needs it in ``X-Feedback-Key`` (checked before the body is read).

The photo is sent again (multipart ``image`` or base64 JSON, the limits of ``/predict``) or named by the
``image_sha256`` of one this process answered recently (kept in a bounded store in memory while
feedback is on)."""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from typing import Any

from flask import Response, request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import ValidationError

from thali.core.errors import DataError
from thali.registry.feedback import MAX_NOTE_CHARS, NONE_OF_THESE, SHA256_HEX, FeedbackStore

from .bodies import SafeParser, part_bytes
from .errors import ApiError, check_key
from .predict import IMAGE_TYPES
from .schemas import (
    ErrorBodySchema,
    FeedbackJSONSchema,
    FeedbackListSchema,
    FeedbackQuerySchema,
    FeedbackRecordSchema,
    FeedbackUploadSchema,
)
from .service import service

blp = Blueprint("feedback", __name__, url_prefix="/v1/domains", description="Corrections for the next model")
blp.ARGUMENTS_PARSER = SafeParser()
KEY_HEADER = "X-Feedback-Key"


class RecentPhotos:
    """The photos this process answered lately, by (domain, sha256), at most ``max_bytes`` in all: what
    feedback by ``image_sha256`` finds. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.size = int(max_bytes), 0
        self._data: OrderedDict[tuple[str, str], tuple[bytes, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, domain: str, sha: str, photo: bytes, answer: dict[str, Any]) -> None:
        if len(photo) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop((domain, sha), None)
            if old is not None:
                self.size -= len(old[0])
            self._data[(domain, sha)] = (photo, answer)
            self.size += len(photo)
            while self.size > self.max_bytes:
                _, (dropped, _) = self._data.popitem(last=False)
                self.size -= len(dropped)

    def get(self, domain: str, sha: str) -> tuple[bytes, dict[str, Any]] | None:
        with self._lock:
            found = self._data.get((domain, sha))
            if found is not None:
                self._data.move_to_end((domain, sha))
            return found


def _store() -> FeedbackStore:
    store = service().hosting.feedback
    if store is None:
        raise ApiError(
            404, "not_found", "feedback is off on this server (start it with THALI_FEEDBACK=FOLDER)"
        )
    return store


def require_key() -> None:
    """Feedback on, and its key when one is set: checked before the body is read."""
    if request.endpoint and not request.endpoint.startswith("feedback."):
        return
    _store()
    key = service().settings.feedback_key
    if key is None:
        return
    check_key(KEY_HEADER, key, "feedback")


blp.before_request(require_key)


def _wrong(message: str, errors: dict[str, Any]) -> ApiError:
    return ApiError(422, "unprocessable_entity", message, errors)


def _fields() -> dict[str, Any]:
    """``image`` (bytes) or ``image_sha256``, ``label``, ``note`` from a multipart or JSON body."""
    limit = service().settings.max_upload_bytes
    if request.mimetype == "multipart/form-data":
        found: dict[str, Any] = {}
        for name in ("label", "note", "image_sha256"):
            values = request.form.getlist(name)
            if len(values) > 1:
                raise _wrong(f"{len(values)} {name!r} fields; send one", {name: "exactly one"})
            if values:
                found[name] = values[0]
        uploads = request.files.getlist("image") + request.form.getlist("image")
        if len(uploads) > 1:
            raise _wrong(f"{len(uploads)} 'image' parts; send one photo", {"image": "exactly one"})
        if uploads:
            part = uploads[0]
            found["image"] = (
                part_bytes(part)[: limit + 1] if isinstance(part, str) else part.stream.read(limit + 1)
            )
        try:
            return FeedbackJSONSchema().load({k: v for k, v in found.items() if k != "image"}) | (
                {"image": found["image"]} if "image" in found else {}
            )
        except ValidationError as exc:
            messages = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
            raise _wrong("the request has invalid fields: " + ", ".join(messages), messages) from None
    if request.mimetype == "application/json":
        try:
            data = FeedbackJSONSchema().load(request.get_json(silent=False))
        except ValidationError as exc:
            messages = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
            raise _wrong("the request has invalid fields: " + ", ".join(messages), messages) from None
        if "image" in data:
            text = data["image"]
            if len(text) // 4 * 3 > limit + 3:
                raise ApiError(413, "payload_too_large", f"image is over the limit of {limit:,} bytes")
            try:
                data["image"] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise _wrong("image: not valid base64", {"image": "not valid base64"}) from None
        return data
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send feedback as multipart/form-data or JSON, not {request.mimetype or 'an empty body'}",
    )


def _photo_and_answer(domain: str, data: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The photo and the server's own answer to it: answered now (an answer of the last minutes comes
    from the cache), or the one kept with ``image_sha256``."""
    hosting, limit = service().hosting, service().settings.max_upload_bytes
    if "image" in data and "image_sha256" in data:
        raise _wrong("send image or image_sha256, not both", {"image": "or image_sha256"})
    if "image" in data:
        photo = data["image"]
        if len(photo) > limit:
            raise ApiError(413, "payload_too_large", f"image is over the limit of {limit:,} bytes")
        return photo, hosting.predict(domain, [photo], 1, False)[0]
    sha = data.get("image_sha256")
    if not sha:
        raise _wrong("send the photo (image) or the image_sha256 of one answered here", {"image": "missing"})
    found = hosting.recent.get(domain, sha) if hosting.recent is not None else None
    if found is None:
        raise ApiError(
            404,
            "not_found",
            f"{domain}: no photo with that image_sha256 among the ones answered recently; send the photo",
            errors={"image_sha256": "not among the recent answers"},
        )
    return found


def _image_format(photo: bytes) -> str:
    from thali.core.images import image_format

    return image_format(photo, service().hosting.limits)


@blp.route("/<name:domain>/feedback")
class Feedback(MethodView):
    @blp.doc(
        requestBody={
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": FeedbackUploadSchema,
                    "encoding": {"image": {"contentType": IMAGE_TYPES}},
                },
                "application/json": {"schema": FeedbackJSONSchema},
            },
        },
    )
    @blp.response(201, FeedbackRecordSchema)
    @blp.alt_response(404, schema=ErrorBodySchema, description="unknown domain, feedback off, sha not recent")
    @blp.alt_response(422, schema=ErrorBodySchema, description="unknown label, bad fields, oversize note")
    @blp.alt_response(413, schema=ErrorBodySchema, description="photo too large (bytes or pixels)")
    @blp.alt_response(401, schema=ErrorBodySchema, description="feedback key missing")
    @blp.alt_response(403, schema=ErrorBodySchema, description="feedback key wrong")
    @blp.alt_response(507, schema=ErrorBodySchema, description="the feedback store is full")
    def post(self, domain: str) -> tuple[dict[str, Any], int]:
        """Correct an answer: the photo (or its image_sha256), the right label (or none_of_these), a note"""
        store = _store()
        model = service().hosting.get(domain)
        data = _fields()
        classes = [str(c.get("name")) for c in model.labels.get("classes", [])]
        label = data["label"]
        if label not in classes and label != NONE_OF_THESE:
            raise _wrong(
                f"{label[:100]!r} is not a class of {domain} (one of {', '.join(classes)}, "
                f"or {NONE_OF_THESE})",
                {"label": "not a class of the domain"},
            )
        note = data.get("note")
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise _wrong(f"note is over {MAX_NOTE_CHARS} characters", {"note": "too long"})
        photo, answer = _photo_and_answer(domain, data)
        try:
            image_format = _image_format(photo)
        except DataError as exc:
            raise ApiError(exc.http_status, exc.code, exc.message) from None
        top = answer["predictions"][0]
        said = NONE_OF_THESE if answer.get("unknown") else top["label"]
        record = {
            "label": label,
            "model_version": int(answer["version"]),
            "variant": str(answer["variant"]),
            "answer_label": top["label"],
            "answer_probability": float(top["probability"]),
            "answer_unknown": bool(answer.get("unknown")),
            "agreed": label == said,
            "note": note,
        }
        stored = store.add(domain, photo, image_format, record)
        service().metrics.feedback.labels(domain, label, "agreed" if stored["agreed"] else "corrected").inc()
        return stored, 201

    @blp.arguments(FeedbackQuerySchema, location="query")
    @blp.response(200, FeedbackListSchema)
    @blp.alt_response(404, schema=ErrorBodySchema, description="unknown domain, or feedback off")
    def get(self, query: dict[str, Any], domain: str) -> dict[str, Any]:
        """The newest corrections of a domain (at most limit, each read once: a call costs the same
        however large the store), with counts per label (agreed, corrected) over them; total counts
        every record"""
        store = _store()
        service().hosting.get(domain)
        total, records = store.newest(domain, query["limit"])
        return {
            "domain": domain,
            "total": total,
            "counted": len(records),
            "counts": store.counts(records),
            "records": records,
        }


@blp.route("/<name:domain>/feedback/photos/<string:image_sha256>")
class FeedbackPhoto(MethodView):
    @blp.response(200, description="the stored photo's bytes")
    @blp.alt_response(404, schema=ErrorBodySchema, description="no such photo, or feedback off")
    def get(self, domain: str, image_sha256: str) -> Response:
        """A stored feedback photo"""
        from thali.registry.feedback import MEDIA_TYPE

        store = _store()
        service().hosting.get(domain)
        if not SHA256_HEX.fullmatch(image_sha256):
            raise ApiError(404, "not_found", "no such photo", errors={"image_sha256": "64 hex digits"})
        try:
            photo, suffix = store.photo(domain, image_sha256, service().settings.max_upload_bytes)
        except FileNotFoundError:
            raise ApiError(404, "not_found", f"{domain}: no feedback photo {image_sha256}") from None
        return Response(photo, mimetype=MEDIA_TYPE.get(suffix, "application/octet-stream"))
