"""``thali serve``: the REST service under gunicorn (threaded workers), or Flask's own server (``--dev``)."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Any

from thali.core.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve registry models over the REST API (OpenAPI at /docs)")
    p.add_argument("--registry", help="registry URL (default $THALI_REGISTRY or ./model-registry)")
    p.add_argument(
        "--domain",
        action="append",
        default=None,
        metavar="NAME[@REF]",
        help="serve this domain (repeatable; default: every domain, at 'production' else latest)",
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (default 1)")
    p.add_argument("--threads", type=int, default=32, help="threads per worker (default 32)")
    p.add_argument("--backend", help="serving backend for every domain (default: each pack's)")
    p.add_argument("--variant", help="variant for every domain (default: each pack's serving.variant)")
    p.add_argument("--max-batch-size", type=int, help="micro-batch size (1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, help="micro-batch wait after the first request")
    p.add_argument("--trusted-key", action="append", default=None, help="serve only packages signed by it")
    p.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="poll the registry every SECONDS and hot-swap a domain when its alias moves",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics on this port only (on --host), not on the public port",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="also serve the Open Inference Protocol over gRPC on PORT (on --host; extra 'grpc')",
    )
    p.add_argument("--no-docs", action="store_true", help="no Swagger UI at /docs")
    p.add_argument("--dev", action="store_true", help="Flask's development server instead of gunicorn")
    p.set_defaults(func=run_serve)


def settings_from(args: argparse.Namespace) -> Any:
    """Settings from ``THALI_*`` with the command's options on top."""
    from pydantic import ValidationError

    from .settings import Settings

    given = {
        "registry": args.registry,
        "domains": args.domain,
        "backend": args.backend,
        "variant": args.variant,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "trusted_keys": args.trusted_key,
        "watch_s": args.watch,
        "metrics_port": getattr(args, "metrics_port", None),
        "docs": False if getattr(args, "no_docs", False) else None,
        "grpc_port": getattr(args, "grpc_port", None),
        "grpc_host": args.host if getattr(args, "grpc_port", None) else None,
    }
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"serve: {field}: {first['msg']}") from None
    if settings.grpc_port:  # before any worker starts: a missing extra is one line, not a boot loop
        try:
            import grpc  # noqa: F401
            import tritonclient.grpc  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"serve: --grpc-port needs the grpc extra ({exc.name} is not installed): "
                "pip install 'thali[grpc]'"
            ) from None
    from .hosting import split_ref
    from .settings import refuse_placeholder_secrets

    refuse_placeholder_secrets()
    for text in settings.domains:  # before any worker starts: a bad name is one line, not a boot loop
        split_ref(text)
    return settings


def _log_to_terminal() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [thali] %(message)s", force=True)
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_serve(ctx: Any) -> int:
    args = ctx.args
    settings = settings_from(args)
    _log_to_terminal()
    if args.dev:
        from .app import create_app

        app = create_app(settings, ctx.plugins)
        print(f"thali serving on http://{args.host}:{args.port} (Swagger UI /docs) - development server")
        app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)
        return 0
    return serve_gunicorn(settings, args)


def serve_gunicorn(settings: Any, args: argparse.Namespace) -> int:
    """gunicorn in this process: the master forks ``--workers`` gthread workers, each building the app
    (and loading the models) once; SIGTERM/SIGINT stop gracefully, requests in flight finish."""
    from gunicorn.app.base import BaseApplication

    # several workers share their metrics through files; so does a metrics port, served by the master
    if (args.workers > 1 or settings.metrics_port) and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="thali-metrics-")
        # prometheus_client chose its value class when it was imported (settings_from imports it, via
        # hosting): choose again, or the workers keep their values in memory and a scrape sees none
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    block = list(args.block_plugin or ())
    no_autoload = bool(args.no_autoload)

    metrics = _metrics_server(args.host, settings.metrics_port) if settings.metrics_port else None

    class Application(BaseApplication):
        def load_config(self) -> None:
            options = {
                "bind": f"{args.host}:{args.port}",
                "workers": args.workers,
                "threads": args.threads,
                "worker_class": "thali.api.worker.ThaliThreadWorker",
                "timeout": 120,
                "graceful_timeout": 30,
                "keepalive": 5,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "info",
                "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
                "child_exit": _child_exit,
                "when_ready": metrics,
            }
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24: one per user is shared
                options["control_socket_disable"] = True
            for key, value in options.items():
                if value is not None:
                    self.cfg.set(key, value)

        def load(self) -> Any:
            from thali.core import build_plugin_manager

            from .app import create_app

            _log_to_terminal()
            plugins = build_plugin_manager(autoload=False if no_autoload else None, block=block)
            return create_app(settings, plugins)

    print(
        f"thali serving on http://{args.host}:{args.port}  (Swagger UI: http://{args.host}:{args.port}/docs)"
    )
    Application().run()
    return 0


def _metrics_server(host: str, port: int) -> Any:
    """gunicorn's ``when_ready``: the master serves every worker's metrics on their own port."""

    def when_ready(server: Any) -> None:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(port, addr=host, registry=registry)
        server.log.info("metrics on http://%s:%d/metrics", host, port)

    return when_ready


def _child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
