"""The plugin manager: finds plugins, checks them against the hook specs, fills the registries.

Built in a function (:func:`build_plugin_manager`), never at import time. Plugins come from
:data:`DEFAULT_PLUGINS` (the built-ins, which are ordinary plugins) and from the entry-point group
``thali`` (third-party packages). ``THALI_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points;
``THALI_BLOCK_PLUGINS=a,b`` (or ``block=``) blocks plugins by name, built-ins included.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, ThaliError, one_line
from .registry import COMPONENT_KINDS, Registries

ENTRY_POINT_GROUP = "thali"
AUTOLOAD_ENV = "THALI_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "THALI_BLOCK_PLUGINS"

#: Where a registered plugin came from: (module or entry-point value, source, distribution, version).
Origin = tuple[str, str, str | None, str | None]

#: The built-in plugins, registered in this order before any third-party plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "thali.plugins.domain_packs",
    "thali.plugins.datasets",
    "thali.plugins.backbones_timm",
    "thali.plugins.backbone_se_cnn",
    "thali.plugins.attention_se",
    "thali.plugins.attention_cbam",
    "thali.plugins.attention_eca",
    "thali.plugins.attention_coord",
    "thali.plugins.attention_nonlocal",
    "thali.plugins.losses",
    "thali.plugins.exporter_onnx",
    "thali.plugins.exporter_int8",
    "thali.plugins.exporter_fp16",
    "thali.plugins.serving_onnxruntime",
    "thali.plugins.serving_torch",
)


@dataclass(frozen=True)
class PluginInfo:
    """What ``thali plugins`` and ``GET /v1/plugins`` report about one plugin."""

    name: str
    module: str
    source: str  # "builtin", "entry-point" or "direct"
    distribution: str | None
    version: str | None
    components: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "source": self.source,
            "distribution": self.distribution,
            "version": self.version,
            "components": self.components,
        }


@dataclass
class ThaliPluginManager:
    """A built plugin manager: the pluggy manager, the filled registries and what was loaded."""

    pm: pluggy.PluginManager
    registries: Registries
    _origins: dict[str, Origin]
    blocked: list[str] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def plugins(self) -> list[PluginInfo]:
        """One :class:`PluginInfo` per registered plugin, in registration order."""
        components: dict[str, dict[str, list[str]]] = {}
        for kind, registry in self.registries.items():
            for entry in registry:
                components.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
        infos = []
        for name, (module, source, dist, version) in self._origins.items():
            infos.append(PluginInfo(name, module, source, dist, version, components.get(name, {})))
        return infos

    def report(self, kind: str | None = None) -> dict[str, Any]:
        """What ``thali plugins --json`` and ``GET /v1/plugins`` show: plugins, blocked names, and the
        components of every kind (or of ``kind``) with the plugin that registered each."""
        if kind:
            self.registries.of(kind)  # validates the kind name
        return {
            "plugins": [i.to_dict() for i in self.plugins()],
            "blocked": list(self.blocked),
            "components": {
                k: [
                    {
                        "name": e.name,
                        "plugin": e.plugin,
                        "description": e.description,
                        "metadata": dict(e.metadata),
                    }
                    for e in registry
                ]
                for k, registry in self.registries.items()
                if not kind or k == kind
            },
        }


def _thali_version() -> str | None:
    try:
        return metadata.version("thali")
    except metadata.PackageNotFoundError:
        return None


def _blocked_names(block: Iterable[str]) -> list[str]:
    env = [b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()]
    return list(dict.fromkeys([*env, *block]))


def _register(pm: pluggy.PluginManager, plugin: object, name: str, origin: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} ({origin}) does not fit the hook specs: {exc}") from None
    except ValueError as exc:  # pluggy: name or object already registered
        raise PluginError(f"plugin {name!r} ({origin}) cannot be registered: {exc}") from None


def _entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    unique = {(ep.name, ep.value): ep for ep in eps}  # a dist seen on two sys.path entries
    return sorted(unique.values(), key=lambda ep: ep.name)


def _check_pending(pm: pluggy.PluginManager) -> None:
    known = [name for name in dir(hookspecs) if name.startswith("thali_")]
    for name in pm.hook.__dict__:
        caller = getattr(pm.hook, name)
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known hooks: {', '.join(known)}"
            raise PluginError(
                f"plugin {impl.plugin_name!r} implements unknown hook {name!r}{hint}",
                errors={"plugin": impl.plugin_name, "hook": name},
            )
    pm.check_pending()  # anything pluggy still finds wrong


def build_plugin_manager(
    *,
    autoload: bool | None = None,
    block: Iterable[str] = (),
    plugins: Sequence[tuple[str, object]] = (),
    builtins: Sequence[str] = DEFAULT_PLUGINS,
) -> ThaliPluginManager:
    """Build a plugin manager and fill one registry per component kind.

    ``autoload``: load third-party plugins from the ``thali`` entry-point group (default: yes unless
    ``THALI_DISABLE_PLUGIN_AUTOLOAD`` is set). ``block``: plugin names never to register (added to
    ``THALI_BLOCK_PLUGINS``). ``plugins``: extra ``(name, plugin_object)`` pairs registered after the
    entry points. Raises :class:`PluginError` for a plugin that fails to import or implements an unknown
    hook, and :class:`DuplicateComponentError` when two plugins register the same component name.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    blocked = _blocked_names(block)
    for name in blocked:
        pm.set_blocked(name)
    origins: dict[str, Origin] = {}
    _register_builtins(pm, builtins, origins)
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        _register_entry_points(pm, origins)
    _register_direct(pm, plugins, origins)
    _check_pending(pm)
    registries = _fill_registries(pm, origins)
    return ThaliPluginManager(pm=pm, registries=registries, _origins=origins, blocked=blocked)


def _register_builtins(pm: pluggy.PluginManager, builtins: Sequence[str], origins: dict[str, Origin]) -> None:
    """The built-in plugin modules, in order (a blocked one skipped)."""
    version = _thali_version()
    for module_name in builtins:
        if pm.is_blocked(module_name):
            continue
        module = importlib.import_module(module_name)
        _register(pm, module, module_name, "built-in")
        origins[module_name] = (module_name, "builtin", "thali", version)


def _register_entry_points(pm: pluggy.PluginManager, origins: dict[str, Origin]) -> None:
    """Third-party plugins of the ``thali`` entry-point group, by name; a name taken twice is an error."""
    for ep in _entry_points():
        dist_name = ep.dist.name if ep.dist else None
        dist_version = ep.dist.version if ep.dist else None
        origin = f"entry point {ep.name} = {ep.value} in {dist_name or '?'} {dist_version or ''}"
        if pm.is_blocked(ep.name):
            continue
        if ep.name in origins:
            first = origins[ep.name]
            raise PluginError(
                f"two plugins are named {ep.name!r}: {first[0]} ({first[2]}) and {ep.value} "
                f"({dist_name}); uninstall or block one (THALI_BLOCK_PLUGINS={ep.name})"
            )
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} failed to import ({origin.strip()}): {type(exc).__name__}: {exc}"
            ) from exc
        _register(pm, plugin, ep.name, origin)
        origins[ep.name] = (ep.value, "entry-point", dist_name, dist_version)


def _register_direct(
    pm: pluggy.PluginManager, plugins: Sequence[tuple[str, object]], origins: dict[str, Origin]
) -> None:
    """The ``(name, plugin_object)`` pairs passed to :func:`build_plugin_manager`."""
    for name, plugin in plugins:
        if pm.is_blocked(name):
            continue
        _register(pm, plugin, name, "passed directly")
        origins[name] = (getattr(plugin, "__name__", type(plugin).__name__), "direct", None, None)


def _fill_registries(pm: pluggy.PluginManager, origins: dict[str, Origin]) -> Registries:
    """One registry per component kind, filled by every plugin's ``thali_register_<kind>`` hook."""
    registries = Registries()
    for kind in COMPONENT_KINDS:
        registry = registries.of(kind)
        caller = getattr(pm.hook, f"thali_register_{kind}")
        for impl in caller.get_hookimpls():
            _, _, dist, version = origins.get(impl.plugin_name, ("", "", None, None))
            origin = f"{dist} {version}" if dist else ""
            with registry.registering_as(impl.plugin_name, origin):
                try:
                    impl.function(registry=registry)
                except ThaliError:
                    raise
                except Exception as exc:
                    where = f"plugin {impl.plugin_name!r}" + (f" ({origin})" if origin else "")
                    raise PluginError(f"{where} failed in thali_register_{kind}: {one_line(exc)}") from exc
    return registries
