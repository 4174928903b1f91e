"""``/healthz`` (the process answers), ``/readyz`` (every configured domain is loaded), ``/metrics``
(Prometheus), and ``/v1/plugins``."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from .errors import ApiError
from .schemas import HealthSchema, PluginsSchema, ReadySchema
from .service import service

blp = Blueprint("service", __name__, description="Health, readiness, metrics, plugins")


@blp.route("/healthz")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    def get(self) -> dict[str, str]:
        """The process is alive"""
        return {"status": "ok"}


@blp.route("/readyz")
class Ready(MethodView):
    @blp.response(200, ReadySchema)
    @blp.alt_response(503, schema=ReadySchema, description="a configured domain is not loaded")
    def get(self) -> Any:
        """Every configured domain is loaded; else 503 naming the domain and why. With ``--watch``,
        ``watch`` tells per domain the ref followed, the last check, and a version refused (still ready:
        the previous version is served)"""
        hosting = service().hosting
        domains: dict[str, Any] = {
            name: {"ready": True, "version": m.version, "variant": m.variant}
            for name, m in hosting.models.items()
        }
        for name, why in hosting.public_failures().items():
            domains[name] = {"ready": False, "error": why}
        for name in hosting.wanted:
            domains.setdefault(name, {"ready": False, "error": "not loaded"})
        ready = bool(domains) and all(d["ready"] for d in domains.values())
        if not domains:
            domains["(none)"] = {"ready": False, "error": "no models in the registry"}
        answer: dict[str, Any] = {"status": "ready" if ready else "not ready", "domains": domains}
        if hosting.watcher is not None:  # what the registry watch saw: a refused version, an error
            answer["watch"] = {
                name: _public_state(hosting, state) for name, state in list(hosting.watcher.state.items())
            }
        return answer, (200 if ready else 503)


@blp.route("/metrics")
class PrometheusMetrics(MethodView):
    @blp.doc(responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
    def get(self) -> Response:
        """Prometheus metrics (404 here when the server has a metrics port of its own)"""
        if service().settings.metrics_port:
            raise ApiError(404, "not_found", "metrics are served on the server's metrics port only")
        data, content_type = service().metrics.render()
        return Response(data, content_type=content_type)


@blp.route("/v1/plugins")
class Plugins(MethodView):
    @blp.response(200, PluginsSchema)
    def get(self) -> dict[str, Any]:
        """Loaded plugins and the components each contributes (what `thali plugins --json` shows)"""
        import json

        report = json.loads(json.dumps(service().plugins.report(), default=str))
        for entries in report.get("components", {}).values():  # install paths are not for the public
            for entry in entries if isinstance(entries, list) else ():
                if isinstance(entry, dict) and isinstance(entry.get("metadata"), dict):
                    entry["metadata"].pop("path", None)
        for plugin in report.get("plugins", []):
            if isinstance(plugin, dict):
                plugin.pop("path", None)
        return report


def _public_state(hosting: Any, state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if isinstance(out.get("error"), str):
        out["error"] = hosting.public(out["error"])
    if isinstance(out.get("refused"), dict):
        out["refused"] = {**out["refused"], "error": hosting.public(str(out["refused"].get("error", "")))}
    return out
