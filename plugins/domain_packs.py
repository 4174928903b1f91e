"""Registers the domain packs shipped with thali (every folder of ``thali.domains`` with a domain.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.domains import CONFIG_FILE, register_domain_dir
from thali.core.registry import Registry


@hookimpl
def thali_register_domains(registry: Registry[Any]) -> None:
    import thali.domains

    for base in thali.domains.__path__:
        for folder in sorted(Path(base).iterdir()):
            if (folder / CONFIG_FILE).is_file():
                register_domain_dir(registry, folder)
