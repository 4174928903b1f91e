"""``thali up``: the REST service and the UI together, for a person at a terminal (``make run`` runs it).

Starts ``thali serve`` and ``thali ui`` as child processes on 127.0.0.1, waits until ``/readyz`` and
the UI answer, prints the three URLs, and stops both cleanly on Ctrl-C (or when either one dies)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from thali.core.errors import ThaliError

from .context import Context

STOP_S = 20.0  # how long Ctrl-C waits for the API and the UI before it kills what is left


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="serve a registry and open the UI on it (Ctrl-C stops both)")
    p.add_argument("--registry", help="registry URL (default $THALI_REGISTRY, else ./models if present)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.add_argument("--ui-port", type=int, default=8501, help="UI port (default 8501)")
    p.add_argument("--ui-domain", help="the domain the UI shows first (default: the first one)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for both to be ready")
    p.add_argument(
        "--feedback",
        help="where corrections go (default $THALI_FEEDBACK, else ./feedback); 'off' for none",
    )
    p.set_defaults(func=run_up)


def _thali() -> list[str]:
    script = Path(sys.executable).parent / "thali"
    return [str(script)] if script.exists() else [sys.executable, "-m", "thali.core.cli"]


def _answers(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def default_registry() -> str:
    if os.environ.get("THALI_REGISTRY"):
        return os.environ["THALI_REGISTRY"]
    return "models" if Path("models").is_dir() else "model-registry"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_up(ctx: Context) -> int:
    args = ctx.args
    registry = args.registry or default_registry()
    api, ui = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{args.ui_port}"
    # Ctrl-C and `kill` stop both cleanly, also where SIGINT arrives ignored (a background job of a
    # non-interactive shell starts with SIGINT ignored, and Python then never raises KeyboardInterrupt).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    # each child leads a process group of its own (gunicorn's workers join the server's): thali up alone
    # decides how they stop, and can end a whole group, workers included, if one does not stop in time
    feedback = args.feedback or os.environ.get("THALI_FEEDBACK") or "feedback"
    env = dict(os.environ)
    if feedback == "off":
        env.pop("THALI_FEEDBACK", None)
    else:
        env["THALI_FEEDBACK"] = feedback
    serve = subprocess.Popen(
        [*_thali(), "serve", "--registry", registry, "--port", str(args.port)],
        start_new_session=True,
        env=env,
    )
    children = [serve]
    try:
        ui_args = ["--domain", args.ui_domain] if args.ui_domain else []
        children.append(
            subprocess.Popen(
                [*_thali(), "ui", "--api", api, "--port", str(args.ui_port), *ui_args],
                start_new_session=True,
            )
        )
        deadline = time.time() + args.timeout
        while True:
            ready, ui_ok = _answers(api + "/readyz"), _answers(ui + "/_stcore/health")
            if ready in (200, 503) and ui_ok == 200:
                break
            dead = [c for c in children if c.poll() is not None]
            if dead:
                raise ThaliError(
                    f"`thali {'serve' if dead[0] is serve else 'ui'}` exited; see its output above"
                )
            if time.time() > deadline:
                raise ThaliError(f"the API or the UI did not come up within {args.timeout:g} s")
            time.sleep(0.5)
        note = "" if ready == 200 else f"  (not every domain loaded: see {api}/readyz)"
        print(f"\nthali is up, serving {registry}{note}")
        print(f"  UI       {ui}")
        print(f"  API      {api}/v1/domains")
        print(f"  Swagger  {api}/docs")
        if feedback != "off":
            print(
                f"  Feedback corrections from the UI and the API go to {feedback} "
                "(thali feedback list DOMAIN)"
            )
        print("Ctrl-C stops both.", flush=True)
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        raise ThaliError("a child process stopped; stopping the other")
    except KeyboardInterrupt:
        print("\nstopping …", flush=True)
        return 0
    finally:
        _stop(children, serve)


def _stop(children: list[subprocess.Popen[bytes]], serve: subprocess.Popen[bytes]) -> None:
    """SIGINT to the API's group (gunicorn's quick shutdown: master and workers), SIGTERM to the UI's;
    a group still there after STOP_S seconds is killed whole, so no worker outlives ``thali up``."""
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGINT if child is serve else signal.SIGTERM)
    deadline = time.monotonic() + STOP_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            name = "thali serve" if child is serve else "thali ui"
            print(f"{name} did not stop within {STOP_S:g} s; killing it and its workers", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
