"""The one error body of the API, ``{code, status, message, errors}``, for every failure: thali's own
errors, flask-smorest/webargs validation (422), and any HTTP error Werkzeug raises (404, 405, 413 …).
An unexpected exception is logged with its traceback and answered 500 with the same body."""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from thali.core.errors import ThaliError

log = logging.getLogger("thali.api")


class ApiError(ThaliError):
    """An answer of the service that is not a model or data error: its HTTP status and code per instance
    (422 wrong fields, 415 unsupported body, 413 too large, 401/403 admin key, 503 unavailable)."""

    def __init__(self, status: int, code: str, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message, errors=errors)
        self.http_status, self.code = status, code


_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@", re.IGNORECASE)
_ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+")


def check_key(header: str, expected: Any, what: str) -> None:
    """The request's ``header`` holds the secret ``expected`` (a SecretStr), compared in constant time:
    401 when it is missing, 403 when it is wrong."""
    import hmac

    from flask import request

    given = request.headers.get(header)
    if not given:
        raise ApiError(401, "unauthorized", f"send the {what} key in the {header} header")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(403, "forbidden", f"wrong {what} key")


def public_text(text: str, hide: tuple[str, ...] = ()) -> str:
    """``text`` fit for a public answer: the registry's URL and folders (``hide``) become "the registry",
    credentials in any URL go, and absolute paths keep only their last part (a file name)."""
    for secret in sorted((h for h in hide if h and len(h) > 1), key=len, reverse=True):
        text = text.replace(secret.rstrip("/") + "/", "").replace(secret.rstrip("/"), "the registry")
    text = _CREDENTIALS.sub(r"\1", text)
    return _ABSOLUTE.sub("", text)


def body(code: str, status: int, message: str, errors: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "status": status, "message": message, "errors": errors or {}}


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "error"


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ThaliError)
    def thali_error(exc: ThaliError) -> Any:
        answer = exc.to_dict()
        hosting = app.extensions["thali"].hosting if "thali" in app.extensions else None
        answer["message"] = hosting.public(exc.message) if hosting is not None else public_text(exc.message)
        if _open_inference():
            return jsonify({"error": answer["message"]}), exc.http_status
        return jsonify(answer), exc.http_status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        errors: dict[str, Any] = {}
        data = getattr(exc, "data", None)  # webargs puts field messages here
        if isinstance(data, dict) and "messages" in data:
            errors = data["messages"]
        message = exc.description or exc.name
        if status == 422 and errors:
            message = "the request has invalid fields: " + ", ".join(_fields(errors))
        # the exception's own headers (Allow on a 405, as RFC 9110 asks), without its HTML content type
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        if _open_inference():
            return jsonify({"error": message}), status, headers
        return jsonify(body(_snake(exc.name), status, message, errors)), status, headers

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        log.exception("unexpected error while answering a request")
        return jsonify(body("internal_error", 500, "internal error; see the server log")), 500


def _open_inference() -> bool:
    """The request is one of the Open Inference Protocol's (``/v2``): its errors are ``{"error": ...}``."""
    from flask import has_request_context, request

    return has_request_context() and (request.path == "/v2" or request.path.startswith("/v2/"))


def _fields(errors: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in errors.items():
        name = f"{prefix}{key}" if key not in ("json", "query", "form", "files", "path") else prefix
        if isinstance(value, dict):
            out += _fields(value, f"{name}." if name else "")
        else:
            out.append(name.rstrip(".") or "body")
    return out
