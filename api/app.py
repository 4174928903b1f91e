"""``create_app(settings)``: the Flask app factory for tests, gunicorn (``thali serve``) and any WSGI
host. It loads every configured domain before it returns, so a worker takes traffic warm."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flask import Flask, g, request
from flask_smorest import Api
from werkzeug.exceptions import RequestEntityTooLarge

from thali.core import __version__

from .cache import AnswerCache
from .errors import register_error_handlers
from .hosting import Hosting
from .metrics import Metrics
from .schemas import ErrorBodySchema
from .service import Service
from .settings import Settings

log = logging.getLogger("thali.api")


class ThaliApi(Api):
    """flask-smorest's Api with thali's error body as the documented default error."""

    ERROR_SCHEMA = ErrorBodySchema


def _swagger_ui_url() -> str | None:
    """Swagger UI's files from the swagger-ui-bundle package, so /docs works offline; else a CDN."""
    try:
        import swagger_ui_bundle  # noqa: F401
    except ImportError:
        return "https://cdn.jsdelivr.net/npm/swagger-ui-dist/"
    return "/docs/static/"


def create_app(settings: Settings | None = None, plugins: Any = None) -> Flask:
    """The REST service for ``settings`` (default: from ``THALI_*``); ``plugins`` a built plugin manager."""
    from thali.core import build_plugin_manager

    settings = settings or Settings()
    plugins = plugins or build_plugin_manager()
    app = Flask("thali.api", instance_path=str(Path(__file__).resolve().parent / "instance"))
    app.config.update(
        API_TITLE="thali",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=_swagger_ui_url(),
        # the whole batch request, base64 included; each image is checked against its own limit
        MAX_CONTENT_LENGTH=int(settings.max_batch_images * settings.max_upload_bytes * 1.4) + 65536,
        API_SPEC_OPTIONS={
            "info": {"description": "Image classification for several domains: predict, explain, manage."},
            "components": {
                "securitySchemes": {"admin_key": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            },
        },
    )
    api = ThaliApi(app)
    register_error_handlers(app)
    metrics, cache = Metrics(), AnswerCache(settings.cache_entries)
    hosting = Hosting(settings, plugins.registries, metrics, cache)
    app.extensions["thali"] = Service(settings, hosting, metrics, plugins)

    from . import admin, domains, health, predict

    for module in (health, domains, predict, admin):
        api.register_blueprint(module.blp)
    if app.config["OPENAPI_SWAGGER_UI_URL"] == "/docs/static/":
        import swagger_ui_bundle
        from flask import send_from_directory

        @app.route("/docs/static/<path:name>")
        def swagger_static(name: str) -> Any:
            return send_from_directory(swagger_ui_bundle.swagger_ui_path, name)

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        limit = app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is not None and request.content_length > limit:
            raise RequestEntityTooLarge(f"the request body is over the limit of {limit:,} bytes")

    @app.after_request
    def _count(response: Any) -> Any:
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        domain = (request.view_args or {}).get("domain", "")
        domain = domain if domain in hosting.models else ("" if not domain else "other")
        metrics.requests.labels(domain, rule, str(response.status_code)).inc()
        if "started" in g:
            took = time.perf_counter() - g.started
            metrics.latency.labels(rule).observe(took)
            response.headers["Server-Timing"] = f"app;dur={1000 * took:.3f}"  # server-side time, for clients
        return response

    hosting.load_configured()
    if settings.watch_s:
        from .watch import RegistryWatcher

        hosting.watcher = RegistryWatcher(hosting, settings.watch_s).start()
    return app
