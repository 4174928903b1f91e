"""Generic component registries.

A :class:`Registry` maps a component *name* (the address used in YAML, the CLI, REST and the UI) to an
:class:`Entry`: a factory that builds the component, the plugin that registered it, and metadata (for a
backbone: input size, mean/std, interpolation, crop, weight source, licence).

Registering is cheap by contract: ``add`` stores a callable and a dict; nothing is built or imported until
``create`` is called.
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import (
    DuplicateComponentError,
    PluginError,
    RegistryError,
    ThaliError,
    UnknownComponentError,
    one_line,
)

if TYPE_CHECKING:
    from .contracts import AnyServingBackend, AttentionModule, Backbone, LabelledSamples, Loss
    from .domains import DomainPack
    from .export import Exporter

T = TypeVar("T")

#: The component kinds, in the order the CLI lists them. Each has one registration hook.
COMPONENT_KINDS: tuple[str, ...] = (
    "datasets",
    "backbones",
    "attention",
    "losses",
    "exporters",
    "serving_backends",
    "domains",
)

_SINGULAR = {
    "datasets": "dataset",
    "backbones": "backbone",
    "attention": "attention module",
    "losses": "loss",
    "exporters": "exporter",
    "serving_backends": "serving backend",
    "domains": "domain",
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component."""

    name: str
    factory: Callable[..., T]
    plugin: str
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    origin: str = ""  # "thali-plant-disease 0.1.0": the distribution and version the plugin came from

    @property
    def who(self) -> str:
        """``plugin 'name', distribution version``: what an error about this component names."""
        return f"plugin {self.plugin!r}" + (f", {self.origin}" if self.origin else "")


def accepts(factory: Callable[..., Any], name: str) -> bool:
    """Whether ``factory`` takes the keyword ``name`` (or any keyword); unknown signatures: yes."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def closest_names(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """The registered names that look most like ``name`` (substring matches first)."""
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    lowered = name.lower()
    substr = [c for c in candidates if lowered and (lowered in c.lower() or c.lower() in lowered)]
    ordered = list(dict.fromkeys([*close, *sorted(substr)]))
    return ordered[:n]


class Registry(Generic[T]):
    """A named collection of components of one kind.

    ``add`` registers, ``get`` looks up, ``create`` builds, ``list`` filters with a glob pattern.
    While the plugin manager runs a plugin's registration hook it sets :attr:`current_plugin`, so every
    entry records which plugin contributed it and a duplicate can name both plugins.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.singular = _SINGULAR.get(kind, kind)
        self._entries: dict[str, Entry[T]] = {}
        self.current_plugin: str = "<direct>"
        self.current_origin: str = ""

    @contextmanager
    def registering_as(self, plugin: str, origin: str = "") -> Iterator[Registry[T]]:
        """Attribute every ``add`` inside the block to ``plugin`` (from distribution ``origin``)."""
        previous = self.current_plugin, self.current_origin
        self.current_plugin, self.current_origin = plugin, origin
        try:
            yield self
        finally:
            self.current_plugin, self.current_origin = previous

    def add(
        self,
        name: str,
        factory: Callable[..., T],
        *,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> Entry[T]:
        """Register ``factory`` under ``name``.

        Raises :class:`DuplicateComponentError` naming both plugins when ``name`` is taken, and
        :class:`RegistryError` when the name is empty or the factory is not callable.
        """
        if not isinstance(name, str) or not name.strip():
            raise RegistryError(f"{self.singular} names must be non-empty strings, got {name!r}")
        if not callable(factory):
            raise RegistryError(
                f"{self.singular} {name!r} from plugin {self.current_plugin!r}: factory is not callable"
            )
        if name in self._entries:
            first = self._entries[name].plugin
            raise DuplicateComponentError(
                f"{self.singular} {name!r} is registered twice: by plugin {first!r} and by plugin "
                f"{self.current_plugin!r}; rename one of them or block a plugin "
                "(THALI_BLOCK_PLUGINS or --block-plugin)",
                errors={"name": name, "plugins": [first, self.current_plugin]},
            )
        entry: Entry[T] = Entry(
            name=name,
            factory=factory,
            plugin=self.current_plugin,
            description=description,
            metadata=MappingProxyType(dict(metadata or {})),
            origin=self.current_origin,
        )
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name``; an unknown name raises an error listing the closest names.

        A *family* entry registered as ``"prefix/*"`` answers every ``"prefix/NAME"``: its factory is
        called with ``NAME`` as first argument (e.g. ``timm/resnet50``).
        """
        entry = self._entries.get(name) or self._family_member(name)
        if entry is None:
            raise self.unknown(name)
        return entry

    def _family_member(self, name: str) -> Entry[T] | None:
        prefix, sep, member = str(name).partition("/")
        family = self._entries.get(f"{prefix}/*") if sep and member else None
        if family is None:
            return None
        return Entry(
            name=name,
            factory=functools.partial(family.factory, member),
            plugin=family.plugin,
            description=family.description,
            metadata=family.metadata,
            origin=family.origin,
        )

    def unknown(self, name: str) -> UnknownComponentError:
        """The error for an unknown ``name``, with suggestions."""
        names = sorted(self._entries)
        close = closest_names(str(name), names)
        if close:
            hint = "did you mean " + ", ".join(repr(c) for c in close) + "?"
        elif names:
            hint = "known: " + ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
        else:
            hint = f"no {self.singular} is registered; is the plugin that provides it installed?"
        return UnknownComponentError(
            f"unknown {self.singular} {name!r}; {hint}",
            errors={"name": name, "kind": self.kind, "closest": close},
        )

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> T:
        """Build the component registered as ``name`` with the given arguments.

        A factory that raises anything but a :class:`ThaliError` (a plugin's bug, or parameters from the
        config it does not take) becomes one :class:`PluginError` line naming the component and the
        plugin, never a bare traceback."""
        entry = self.get(name)
        try:
            return entry.factory(*args, **kwargs)
        except ThaliError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{self.singular} {name!r} ({entry.who}) failed to build: {one_line(exc)}",
                errors={"component": name, "kind": self.kind, "plugin": entry.plugin, "origin": entry.origin},
            ) from exc

    def list(self, pattern: str = "*") -> list[Entry[T]]:
        """The entries whose name matches the glob ``pattern``, sorted by name."""
        return [e for n, e in sorted(self._entries.items()) if fnmatch.fnmatchcase(n, pattern)]

    def names(self) -> builtins.list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or (isinstance(name, str) and self._family_member(name) is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"


@dataclass
class Registries:
    """One registry per component kind, filled by the plugins' registration hooks; each is typed with
    the Protocol of what its factories return (:mod:`thali.core.contracts`)."""

    datasets: Registry[LabelledSamples] = field(default_factory=lambda: Registry("datasets"))
    backbones: Registry[Backbone] = field(default_factory=lambda: Registry("backbones"))
    attention: Registry[AttentionModule] = field(default_factory=lambda: Registry("attention"))
    losses: Registry[Loss] = field(default_factory=lambda: Registry("losses"))
    exporters: Registry[Exporter] = field(default_factory=lambda: Registry("exporters"))
    serving_backends: Registry[AnyServingBackend] = field(
        default_factory=lambda: Registry("serving_backends")
    )
    domains: Registry[DomainPack] = field(default_factory=lambda: Registry("domains"))

    def of(self, kind: str) -> Registry[Any]:
        """The registry of ``kind`` (one of :data:`COMPONENT_KINDS`)."""
        if kind not in COMPONENT_KINDS:
            raise RegistryError(f"unknown component kind {kind!r}; one of {', '.join(COMPONENT_KINDS)}")
        return getattr(self, kind)

    def items(self) -> Iterator[tuple[str, Registry[Any]]]:
        for kind in COMPONENT_KINDS:
            yield kind, getattr(self, kind)
