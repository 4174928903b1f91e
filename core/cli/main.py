"""Entry point of the ``thali`` command: global options, dispatch, one-line errors."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from thali.core.errors import NotAvailableError, ThaliError

from . import check, config, domains, export, plugins, predict, train, up
from .context import Context

COMMAND_GROUPS = (plugins, check, domains, config, train, export, predict, up)
# Command groups that live in rooms downstream of core (core never imports them at module level), and
# the commands each adds: when one cannot be imported (a broken install), its commands say so in a line.
DOWNSTREAM_GROUPS = {
    "thali.registry.cli": {
        "publish": "publish an export folder",
        "registry": "manage model versions",
        "feedback": "list and export corrections",
    },
    "thali.api.cli": {"serve": "serve registry models over the REST API"},
    "thali.ui.cli": {"ui": "start the Streamlit UI"},
}


def build_parser() -> argparse.ArgumentParser:
    from thali.core import __version__

    parser = argparse.ArgumentParser(
        prog="thali",
        description="Train, optimise and serve image-classification domain packs.",
    )
    parser.add_argument("--version", action="version", version=f"thali {__version__}")
    parser.add_argument(
        "--block-plugin",
        action="append",
        metavar="NAME",
        help="do not load this plugin (repeatable; also THALI_BLOCK_PLUGINS=a,b)",
    )
    parser.add_argument(
        "--no-autoload",
        action="store_true",
        help="skip third-party plugins from entry points (also THALI_DISABLE_PLUGIN_AUTOLOAD=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    for name, commands in DOWNSTREAM_GROUPS.items():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an installation without that room: its commands say why, in a line
            for command, help_text in commands.items():
                # no option prefix: whatever follows (--registry ...) is taken, and the line says why
                p = sub.add_parser(
                    command, help=f"{help_text} (unavailable: {exc})", prefix_chars="\x00", add_help=False
                )
                p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
                p.set_defaults(func=_unavailable, room=name, reason=str(exc))
            continue
        module.register(sub)
    return parser


def _unavailable(ctx: Context) -> int:
    raise NotAvailableError(
        f"`thali {ctx.args.command}` is unavailable: {ctx.args.room} could not be imported "
        f"({ctx.args.reason}); reinstall thali (pip install 'thali[train]' for everything)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(Context(args)) or 0)
    except ThaliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
