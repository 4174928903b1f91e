"""Commands whose engines arrive in later releases: each is a clear "not available yet" error."""

from __future__ import annotations

import argparse

from thali.core.errors import NotAvailableError

from .context import Context

PLANNED: dict[str, str] = {
    "train": "train a domain pack from its config",
    "evaluate": "score a run or model on an ImageFolder directory",
    "export": "export a trained run to ONNX and optimised variants",
    "bench": "benchmark torch, ONNX Runtime fp32, int8 and fp16 side by side",
    "publish": "publish an export into the model registry",
    "registry": "list, show, promote and remove model versions",
    "serve": "serve models over the REST API",
    "ui": "start the Streamlit UI",
}


def register(sub: argparse._SubParsersAction, skip: set[str]) -> None:
    for name, help_text in PLANNED.items():
        if name in skip:
            continue
        p = sub.add_parser(name, help=f"{help_text} (not available yet)")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=run, planned=name)


def run(ctx: Context) -> int:
    from thali.core import __version__

    raise NotAvailableError(
        f"`thali {ctx.args.planned}` is not available yet in thali {__version__}: "
        f"it will {PLANNED[ctx.args.planned]}"
    )
