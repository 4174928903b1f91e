"""Admin endpoints, off unless ``THALI_ADMIN_KEY`` is set (header ``X-API-Key``, compared in constant
time): load a version or alias, unload, re-resolve the alias. A swap never drops a request."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from .bodies import SafeParser
from .errors import ApiError, check_key
from .hosting import split_ref
from .schemas import DomainSchema, ErrorBodySchema, LoadSchema
from .service import service

blp = Blueprint("admin", __name__, url_prefix="/v1/domains", description="Load, unload, reload (admin key)")
blp.ARGUMENTS_PARSER = SafeParser()
KEY_HEADER = "X-API-Key"


def require_admin() -> None:
    key = service().settings.admin_key
    if key is None:
        raise ApiError(403, "forbidden", "admin endpoints are off: start the server with THALI_ADMIN_KEY")
    check_key(KEY_HEADER, key, "admin")


# the key is checked before anything of the request is read: no key and a bad body is 401, not 422
blp.before_request(require_admin)


def _document(view: Any) -> Any:
    for status, text in {401: "no key", 403: "wrong key, or admin off", 404: "unknown domain"}.items():
        view = blp.alt_response(status, schema=ErrorBodySchema, description=text)(view)
    return blp.doc(security=[{"admin_key": []}])(view)


@blp.route("/<name:domain>")
class Load(MethodView):
    @blp.arguments(LoadSchema, required=False)
    @blp.response(200, DomainSchema)
    @_document
    def put(self, body: dict[str, Any], domain: str) -> dict[str, Any]:
        """Load a version or alias of a domain (loaded and warmed before it takes traffic)"""
        name, _ = split_ref(domain)
        ref = split_ref(f"{name}@{body['ref']}")[1] if body.get("ref") else None
        return service().hosting.pin(name, ref, body.get("variant")).summary()

    @blp.response(204)
    @_document
    def delete(self, domain: str) -> None:
        """Unload a domain (requests already queued are answered first)"""
        service().hosting.unload(domain)


@blp.route("/<name:domain>/reload")
class Reload(MethodView):
    @blp.response(200, DomainSchema)
    @_document
    def post(self, domain: str) -> dict[str, Any]:
        """Resolve the domain's alias again and swap in the version it names now"""
        return service().hosting.reload(domain).summary()
