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
