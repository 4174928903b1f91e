"""What every command shares: the global options and a lazily built plugin manager."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from thali.core.plugins import ThaliPluginManager, build_plugin_manager


class Context:
    """Built from the global options; the plugin manager is built on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._pm: ThaliPluginManager | None = None

    @property
    def plugins(self) -> ThaliPluginManager:
        if self._pm is None:
            self._pm = build_plugin_manager(
                autoload=False if self.args.no_autoload else None,
                block=self.args.block_plugin or (),
            )
        return self._pm


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def registry_model(model: str, registry: str | None, trusted_keys: Any = None, or_run: bool = True) -> Any:
    """The verified package of a registry model ``DOMAIN[@REF]`` (default ref: production, else latest);
    ``or_run``: the command also takes a training run folder (its messages say so)."""
    from thali.core.errors import DataError, NotAvailableError
    from thali.core.names import is_valid_name

    domain, _, ref = str(model).partition("@")
    if not is_valid_name(domain):
        also = "no such training run folder, and " if or_run else ""
        raise DataError(f"{model}: {also}not a registry model DOMAIN[@REF]")
    try:
        from thali.registry import ModelRegistry
    except ImportError:
        hint = "; pass a training run folder" if or_run else " (pip install thali)"
        raise NotAvailableError(f"the model registry is not installed{hint}") from None
    found = ModelRegistry(registry, trusted_keys=trusted_keys)
    return found.resolve(domain, ref or found.default_ref(domain))
