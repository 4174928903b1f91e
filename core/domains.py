"""Domain packs: a folder with a ``domain.yaml`` (and a README card), registered by a plugin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DomainConfig, load_config, read_mapping
from .errors import ConfigError
from .registry import Registries, Registry

CONFIG_FILE = "domain.yaml"


@dataclass(frozen=True)
class DomainPack:
    """A registered domain pack: its name, its folder and its config file."""

    name: str
    root: Path
    description: str = ""

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    def presets(self) -> list[str]:
        """Names of the presets in the pack's ``presets/`` folder."""
        return sorted(p.stem for p in (self.root / "presets").glob("*.yaml"))

    def preset_path(self, name: str) -> Path:
        path = self.root / "presets" / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(self.presets()) or "none"
            raise ConfigError(f"--preset: {self.name} has no preset {name!r}; presets: {known}")
        return path

    def load_config(
        self, overrides: list[str] | None = None, presets: list[str] | None = None
    ) -> DomainConfig:
        paths = [self.preset_path(name) for name in presets or []]
        config = load_config(self.config_path, overrides, paths)
        if config.name != self.name:
            raise ConfigError(
                f"{self.config_path}: name: {config.name!r} does not match the registered domain "
                f"{self.name!r}"
            )
        return config


def register_domain_dir(registry: Registry[Any], folder: str | Path, name: str | None = None) -> None:
    """Register the domain pack in ``folder`` (which holds a ``domain.yaml``).

    The name defaults to the folder name. Only the ``description`` is read now; the full config is
    validated when the domain is used.
    """
    root = Path(folder).resolve()
    path = root / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{root}: a domain pack needs a {CONFIG_FILE}")
    raw = read_mapping(path)
    pack = DomainPack(name=name or root.name, root=root, description=str(raw.get("description", "")))
    registry.add(
        pack.name,
        lambda: pack,
        description=pack.description,
        metadata={"path": str(path), "classes": len(raw.get("classes") or []), "presets": pack.presets()},
    )


def resolve_domain(registries: Registries, name_or_path: str) -> DomainPack:
    """A domain pack by registered name, or by the path of a folder or ``domain.yaml`` file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} and candidate.is_file():
        root = candidate.resolve().parent
        return DomainPack(name=str(read_mapping(candidate).get("name", root.name)), root=root)
    looks_like_path = "/" in name_or_path or "\\" in name_or_path or name_or_path == "."
    if looks_like_path and (candidate / CONFIG_FILE).is_file():
        return DomainPack(name=candidate.resolve().name, root=candidate.resolve())
    return registries.domains.create(name_or_path)
