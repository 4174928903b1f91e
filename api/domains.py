"""``GET /v1/domains``, ``GET /v1/domains/{domain}``: what is served, at which version, how well."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from .schemas import CardSchema, DomainListSchema, DomainSchema, ErrorBodySchema
from .service import service

blp = Blueprint("domains", __name__, url_prefix="/v1/domains", description="The domains this server hosts")


@blp.route("")
class Domains(MethodView):
    @blp.response(200, DomainListSchema)
    def get(self) -> dict[str, Any]:
        """Every loaded domain: version and alias, variant, backend and provider, classes, card headline"""
        hosting = service().hosting
        return {
            "domains": [m.summary() for _, m in sorted(hosting.models.items())],
            "not_loaded": hosting.public_failures(),
        }


@blp.route("/<name:domain>")
class Domain(MethodView):
    @blp.response(200, DomainSchema)
    @blp.alt_response(404, schema=ErrorBodySchema, description="not loaded")
    @blp.alt_response(503, schema=ErrorBodySchema, description="configured, but failed to load")
    def get(self, domain: str) -> dict[str, Any]:
        """One loaded domain"""
        return service().hosting.get(domain).summary()


@blp.route("/<name:domain>/card")
class Card(MethodView):
    @blp.response(200, CardSchema)
    @blp.alt_response(404, schema=ErrorBodySchema, description="not loaded")
    @blp.alt_response(503, schema=ErrorBodySchema, description="configured, but failed to load")
    def get(self, domain: str) -> dict[str, Any]:
        """The model card of the served version: its manifest (metrics per variant: top-1, top-5, ECE,
        per class, confusion matrix; the gate's verdicts; serving defaults; dataset, licence, lineage as
        ids and hashes), schema ``Manifest``"""
        model = service().hosting.get(domain)
        summary = model.summary()
        keys = ("domain", "version", "variant", "backend", "provider", "classes")
        return {**{k: summary[k] for k in keys}, "card": model.card}
