"""``thali ui``: the Streamlit app, as a client of a running ``thali serve``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parent / "app.py"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the Streamlit UI against a thali REST API")
    p.add_argument("--api", help="the API's URL (default $THALI_API_URL or http://127.0.0.1:8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument(
        "--domain",
        help="the domain shown first (default $THALI_UI_DOMAIN, else the first; ?domain= in a link)",
    )
    p.set_defaults(func=run_ui)


def command(api: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The streamlit command line and environment ``thali ui`` runs (also used by tests)."""
    env = {**os.environ, "THALI_API_URL": api, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    args = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
        "--server.maxUploadSize", "25",
    ]  # fmt: skip
    return args, env


def run_ui(ctx: Any) -> int:
    from .client import api_url

    args = ctx.args
    api = (args.api or api_url()).rstrip("/")
    cmd, env = command(api, args.host, args.port)
    if args.domain:
        env["THALI_UI_DOMAIN"] = args.domain
    print(f"thali UI on http://{args.host}:{args.port}  (API: {api})", flush=True)
    # Become Streamlit rather than wait on it: Ctrl-C and SIGTERM (from `thali up`, Docker, Kubernetes)
    # then reach the server itself, and no orphaned Streamlit outlives `thali ui`.
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
