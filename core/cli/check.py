"""``thali check``: run the conformance checks (:mod:`thali.testing`) on plugins and their components.

A TARGET is a plugin name (as ``thali plugins`` lists it), a distribution name (``thali``,
``thali-plant-disease``), ``KIND:NAME`` (``losses:focal``, ``backbones:timm/resnet18``) or a component
name; no target checks every component of every plugin. The report has one line per check and a
summary; the exit code is 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from thali.core.errors import ConfigError
from thali.core.plugins import PluginInfo, ThaliPluginManager
from thali.core.registry import COMPONENT_KINDS, closest_names

from .context import Context, print_json

#: ``loss:focal`` works as well as ``losses:focal``.
KIND_ALIASES = {
    **{k: k for k in COMPONENT_KINDS},
    "dataset": "datasets",
    "backbone": "backbones",
    "loss": "losses",
    "exporter": "exporters",
    "serving_backend": "serving_backends",
    "domain": "domains",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="run thali's conformance checks on plugins' components (forward, backward, ONNX parity, ...)",
        description=(
            "TARGET: a plugin name (as `thali plugins` lists it), a distribution name (thali, "
            "thali-plant-disease), KIND:NAME (losses:focal, backbones:timm/resnet18) or a component name; "
            "no target checks every component of every plugin. Exit code 0 when nothing failed, 1 otherwise."
        ),
    )
    p.add_argument(
        "targets",
        nargs="*",
        metavar="TARGET",
        help="plugin, distribution, KIND:NAME or component name (default: every plugin)",
    )
    p.add_argument("--kind", help="only components of this kind (e.g. backbones)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _kind(name: str) -> str:
    kind = KIND_ALIASES.get(name.strip().lower().replace("-", "_"))
    if kind is None:
        raise ConfigError(f"unknown component kind {name!r}; one of {', '.join(COMPONENT_KINDS)}")
    return kind


def resolve(pm: ThaliPluginManager, targets: list[str], kind: str | None) -> list[tuple[str, str]]:
    """The ``(kind, name)`` components the targets name, in order, without repeats."""
    infos = pm.plugins()
    owned = [(info, k, n) for info in infos for k in COMPONENT_KINDS for n in info.components.get(k, [])]
    chosen: list[tuple[str, str]] = []
    wanted: list[str | None] = list(targets) if targets else [None]  # no target: every plugin
    for target in wanted:
        found = [(k, n) for _, k, n in owned] if target is None else _named(pm, infos, owned, target)
        chosen += [(k, n) for k, n in found if kind in (None, k)]
    return list(dict.fromkeys(chosen))


def _named(
    pm: ThaliPluginManager, infos: list[PluginInfo], owned: list[tuple[PluginInfo, str, str]], target: str
) -> list[tuple[str, str]]:
    """The ``(kind, name)`` components one target names: a plugin name first, then a distribution name,
    then ``kind:name``, then a component name of any kind."""
    plugins = {i.name for i in infos if i.name == target} or {
        i.name for i in infos if i.distribution and _normalise(i.distribution) == _normalise(target)
    }
    if plugins:
        return [(k, n) for info, k, n in owned if info.name in plugins]
    if ":" in target:
        prefix, _, name = target.partition(":")
        k = _kind(prefix)
        pm.registries.of(k).get(name)  # an unknown name: the registry's error, with suggestions
        return [(k, name)]
    found = [(k, target) for k in COMPONENT_KINDS if target in pm.registries.of(k)]
    if not found:
        raise _unknown(pm, target)
    return found


def _unknown(pm: ThaliPluginManager, target: str) -> ConfigError:
    infos = pm.plugins()
    plugins = [i.name for i in infos]
    dists = sorted({i.distribution for i in infos if i.distribution})
    components = sorted({n for _, registry in pm.registries.items() for n in registry.names()})
    close = closest_names(target, plugins + dists + components)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    return ConfigError(
        f"check: {target!r} is not a loaded plugin, distribution or component; {hint}"
        f"plugins: {', '.join(plugins)}; distributions: {', '.join(dists)} (see `thali plugins`)"
    )


def run(ctx: Context) -> int:
    from thali.testing import check_component, counts, format_result, summary
    from thali.testing.results import plugin_header

    pm = ctx.plugins
    kind = _kind(ctx.args.kind) if ctx.args.kind else None
    components = resolve(pm, list(ctx.args.targets), kind)
    results: list[Any] = []
    header = None
    for k, name in components:
        for result in check_component(pm, k, name):
            results.append(result)
            if ctx.args.json:
                continue
            if plugin_header(result) != header:
                header = plugin_header(result)
                print(header)
            print("  " + format_result(result), flush=True)
    if ctx.args.json:
        print_json({"results": [r.to_dict() for r in results], "summary": counts(results)})
    else:
        if not components:
            print(f"no {kind or 'component'} to check", file=sys.stderr)
        print(summary(results))
    return 1 if any(r.failed for r in results) else 0
