"""``create_app(settings)``: the Flask app factory for tests, gunicorn (``thali serve``) and any WSGI
host. It loads every configured domain before it returns, so a worker takes traffic warm."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

from flask import Flask, g, request
from flask_smorest import Api
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from thali.core import __version__
from thali.core.names import NAME_RULE

from .bodies import SafeJSONProvider, ThaliRequest
from .cache import AnswerCache
from .errors import register_error_handlers
from .hosting import Hosting
from .metrics import Metrics
from .schemas import ErrorBodySchema, register_manifest_schemas
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


class NameConverter(BaseConverter):
    """``<name:domain>``: a path segment that follows the one name rule, else the route does not match
    (404), and the spec says the pattern."""

    regex = NAME_RULE.pattern


def _spec_says_the_limits(api: Api, settings: Settings) -> None:
    """The limits this server enforces, in its OpenAPI document: images per batch, bytes per image
    (as base64 length), so a request valid by the spec is one the server takes."""
    schemas = api.spec.components.schemas
    base64_length = 4 * -(-settings.max_upload_bytes // 3)
    n = settings.max_batch_images
    schemas["BatchUpload"]["properties"]["images"].update(minItems=1, maxItems=n)
    schemas["BatchJSON"]["properties"]["images"].update(minItems=1, maxItems=n)
    schemas["BatchJSON"]["properties"]["images"]["items"].update(format="byte", maxLength=base64_length)
    schemas["PredictJSON"]["properties"]["image"].update(format="byte", maxLength=base64_length)
    schemas["FeedbackJSON"]["properties"]["image"].update(format="byte", maxLength=base64_length)
    if settings.feedback_key is not None:  # feedback calls need the key only where one is set
        for path, item in api.spec._paths.items():
            if "/feedback" in path:
                for method, operation in item.items():
                    if method in ("get", "post"):
                        operation["security"] = [{"feedback_key": []}]


#: endpoint -> its body limit in body_limits(); every other route has "other"
ROUTES = {
    "predict.Predict": "single",
    "predict.PredictBatch": "batch",
    "feedback.Feedback": "single",
    "oip.Infer": "batch",
    "oip.InferVersion": "batch",
}


def body_limits(settings: Settings) -> dict[str, int]:
    """Bytes a request body may have, per route: one image (base64 and form overhead included) for
    ``/predict``, a full batch (at most ``max_batch_bytes`` of images) for ``/predict/batch``, 64 KB for
    everything else (admin calls, GETs)."""
    overhead = 65536
    batch = min(settings.max_batch_images * settings.max_upload_bytes, settings.max_batch_bytes)
    return {
        "single": settings.max_upload_bytes * 4 // 3 + overhead,
        "batch": batch * 4 // 3 + overhead,
        "other": overhead,
    }


def create_app(settings: Settings | None = None, plugins: Any = None) -> Flask:
    """The REST service for ``settings`` (default: from ``THALI_*``); ``plugins`` a built plugin manager."""
    from thali.core import build_plugin_manager

    settings = settings or Settings()
    plugins = plugins or build_plugin_manager()
    limits = body_limits(settings)
    app = _flask_app(settings, limits)
    api = _openapi(app)
    metrics, cache = Metrics(), AnswerCache(settings.cache_entries)
    hosting = Hosting(settings, plugins.registries, metrics, cache)
    if settings.feedback:
        from thali.registry.feedback import FeedbackStore

        from .feedback import RecentPhotos

        hosting.feedback = FeedbackStore(
            settings.feedback,
            max_bytes=settings.feedback_max_bytes,
            max_records=settings.feedback_max_records,
        )
        hosting.recent = RecentPhotos(settings.feedback_recent_bytes)
    app.extensions["thali"] = Service(settings, hosting, metrics, plugins)
    _register_routes(app, api, settings)
    _limit_request_bodies(app, limits)
    _count_requests(app, hosting, metrics)
    _start_metrics_server(settings, metrics)
    hosting.load_configured()
    if settings.grpc_port:  # the Open Inference Protocol over gRPC, on the same models and batchers
        from .oip_grpc import start_grpc

        app.extensions["thali_grpc"] = start_grpc(
            app, settings.grpc_host, settings.grpc_port, limits["batch"]
        )
    if settings.watch_s:
        from .watch import RegistryWatcher

        hosting.watcher = RegistryWatcher(hosting, settings.watch_s).start()
    return app


def _flask_app(settings: Settings, limits: dict[str, int]) -> Flask:
    """The Flask app with thali's JSON provider, request class and configuration."""
    app = Flask("thali.api", instance_path=str(Path(__file__).resolve().parent / "instance"))
    app.json = SafeJSONProvider(app)
    app.request_class = ThaliRequest
    app.config.update(
        API_TITLE="thali",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs" if settings.docs else None,
        OPENAPI_SWAGGER_UI_URL=_swagger_ui_url(),
        # the largest body of any route (a full batch, base64 included); each route has its own below
        MAX_CONTENT_LENGTH=limits["batch"],
        MAX_FORM_PARTS=2 * settings.max_batch_images + 64,  # multipart parts parsed at most (else 413)
        API_SPEC_OPTIONS={
            "info": {"description": "Image classification for several domains: predict, explain, manage."},
            "components": {
                "securitySchemes": {
                    "admin_key": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                    "feedback_key": {"type": "apiKey", "in": "header", "name": "X-Feedback-Key"},
                }
            },
        },
    )
    return app


def _openapi(app: Flask) -> ThaliApi:
    """flask-smorest on ``app``: the name converter, the manifest schemas, thali's error handlers."""
    app.url_map.converters["name"] = NameConverter
    api = ThaliApi(app)
    api.register_converter(NameConverter, lambda _: {"type": "string", "pattern": f"^{NAME_RULE.pattern}$"})
    register_manifest_schemas(api.spec)  # the /card answer, field by field, from the pydantic models
    register_error_handlers(app)
    return api


def _register_routes(app: Flask, api: ThaliApi, settings: Settings) -> None:
    """The blueprints, the limits in their spec, and Swagger UI's files when they are installed."""
    from . import admin, domains, feedback, health, oip, predict

    for module in (health, domains, predict, feedback, admin, oip):
        api.register_blueprint(module.blp)
    _spec_says_the_limits(api, settings)
    if app.config["OPENAPI_SWAGGER_UI_URL"] == "/docs/static/":
        import swagger_ui_bundle
        from flask import send_from_directory

        @app.route("/docs/static/<path:name>")
        def swagger_static(name: str) -> Any:
            return send_from_directory(swagger_ui_bundle.swagger_ui_path, name)


def _limit_request_bodies(app: Flask, limits: dict[str, int]) -> None:
    """Before each request: its start time, and its route's body limit (413 past it)."""

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        limit = limits[ROUTES.get(request.endpoint or "", "other")]
        too_large = RequestEntityTooLarge(f"the request body is over this route's limit of {limit:,} bytes")
        # checked from Content-Length before anything is read, and by Werkzeug while a chunked body or
        # a multipart upload streams in: nothing past the limit is read, parsed or spooled
        request.max_content_length = limit
        request.max_form_memory_size = limit  # an image sent as a plain field (no file name) fits
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        if (
            request.content_length is None
            and "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        ):
            # no length to check first: read at most one byte past the limit (Werkzeug's own limit
            # on such a stream truncates silently), then serve the body like one sent with a length
            data = request.environ["wsgi.input"].read(limit + 1)
            if len(data) > limit:
                raise too_large
            request.environ["wsgi.input"] = io.BytesIO(data)
            request.environ["CONTENT_LENGTH"] = str(len(data))
            request.environ.pop("HTTP_TRANSFER_ENCODING", None)


def _count_requests(app: Flask, hosting: Hosting, metrics: Metrics) -> None:
    """After each request: count it by domain, route and status, and time it (``Server-Timing``)."""

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


def _start_metrics_server(settings: Settings, metrics: Metrics) -> None:
    """``--metrics-port`` for --dev, or an app made in Python: this process's metrics on that port (with
    several workers, ``thali serve`` runs the server of the summed metrics instead)."""
    if settings.metrics_port and metrics.registry is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr="127.0.0.1", registry=metrics.registry)
