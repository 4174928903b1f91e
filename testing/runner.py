"""Run the checks of one component, one plugin or every plugin, each check in isolation."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from thali.core.errors import ConfigError, ThaliError, one_line
from thali.core.plugins import PluginInfo, ThaliPluginManager
from thali.core.registry import COMPONENT_KINDS, Entry, Registries, closest_names

from . import data, export, losses, modules
from .checks import TRAIN_EXTRA, TRAIN_MODULES, Check, CheckFailed, CheckSkipped
from .results import CheckResult

Planner = Callable[[Entry[Any], Any, Mapping[str, Any]], list[Check]]

#: Per kind: the function that lists its checks, and the options ``check_component`` accepts for it.
KINDS: dict[str, tuple[Planner, frozenset[str]]] = {
    "datasets": (data.dataset_checks, data.DATASET_OPTIONS),
    "backbones": (modules.backbone_checks, modules.BACKBONE_OPTIONS),
    "attention": (modules.attention_checks, modules.ATTENTION_OPTIONS),
    "losses": (losses.loss_checks, losses.LOSS_OPTIONS),
    "exporters": (export.exporter_checks, export.EXPORTER_OPTIONS),
    "serving_backends": (export.serving_checks, export.SERVING_OPTIONS),
    "domains": (data.domain_checks, data.DOMAIN_OPTIONS),
}
assert set(KINDS) == set(COMPONENT_KINDS), "every component kind needs its checks"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or an import hook that refuses it
        return False


def _missing(names: tuple[str, ...]) -> list[str]:
    return [m for m in names if not _installed(m)]


@contextlib.contextmanager
def _isolated(check: Check) -> Iterator[None]:
    """Hide what third-party code prints, and give torch a fixed seed it forgets afterwards."""
    from thali.core.quiet import quiet

    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet(f"conformance check {check.name!r}"))
        if "torch" in check.needs:
            import torch

            stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.manual_seed(0)
        yield


def run_check(check: Check, kind: str, entry: Entry[Any], distribution: str | None) -> CheckResult:
    """Run one check; whatever it raises becomes a "failed" (or "skipped") result, never a traceback."""

    def result(status: str, detail: str, seconds: float = 0.0) -> CheckResult:
        return CheckResult(kind, entry.name, entry.plugin, check.name, status, detail, seconds, distribution)

    missing = _missing(check.needs)
    if missing:
        return result("skipped", f"needs {TRAIN_EXTRA} ({', '.join(missing)} not installed)")
    started = time.perf_counter()
    try:
        with _isolated(check):
            detail = check.run() or ""
        status = "passed"
    except CheckSkipped as exc:
        status, detail = "skipped", str(exc)
    except CheckFailed as exc:
        status, detail = "failed", str(exc)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root in TRAIN_MODULES:
            status, detail = "skipped", f"needs {TRAIN_EXTRA} ({root} not installed)"
        else:
            status, detail = "failed", f"needs a module that is not installed: {one_line(exc)}"
    except ThaliError as exc:
        status, detail = "failed", exc.message
    except (Exception, SystemExit) as exc:
        status, detail = "failed", one_line(exc)
    return result(status, " ".join(str(detail).split()), time.perf_counter() - started)


def _split(source: Registries | ThaliPluginManager) -> tuple[Registries, ThaliPluginManager | None]:
    if isinstance(source, ThaliPluginManager):
        return source.registries, source
    return source, None


def _distribution(pm: ThaliPluginManager | None, plugin: str) -> str | None:
    for info in pm.plugins() if pm is not None else []:
        if info.name == plugin:
            return describe(info)
    return None


def describe(info: PluginInfo) -> str | None:
    """``thali-fruit 0.1.0`` for the distribution that brought a plugin (None when passed directly)."""
    if not info.distribution:
        return None
    return f"{info.distribution} {info.version or ''}".strip()


def check_entry(
    registries: Registries, kind: str, entry: Entry[Any], distribution: str | None, options: Mapping[str, Any]
) -> list[CheckResult]:
    """Run every check of ``kind`` on ``entry``, in order."""
    planner, known = KINDS[kind]
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown option(s) for {kind}: {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}"
        )
    return [run_check(check, kind, entry, distribution) for check in planner(entry, registries, options)]


def check_component(
    registries: Registries | ThaliPluginManager, kind: str, name: str, **options: Any
) -> list[CheckResult]:
    """Run the conformance checks of component ``name`` of ``kind`` (one of
    :data:`thali.core.registry.COMPONENT_KINDS`); a family member such as ``timm/resnet18`` works too.

    ``registries``: the filled registries or the plugin manager; results name the plugin's distribution.
    ``options`` tune a kind's checks: ``params`` (extra factory arguments, every kind); backbones:
    ``input_size`` (int, default 64 or the metadata's size when smaller), ``onnx`` (False skips the ONNX
    parity check), ``tolerance`` (1e-3 of the largest output); attention: ``channels`` (default
    ``(16, 96)``; ONNX parity at the last), ``onnx``, ``tolerance`` (1e-4 of the largest output); losses:
    ``num_classes`` (5), ``class_counts``; exporters and serving backends: ``tolerance`` (absolute, on
    logits: 1e-3 and 1e-4). An unknown kind or name raises a :class:`~thali.core.RegistryError`,
    an unknown option a ``TypeError``; everything a check finds is a result."""
    regs, pm = _split(registries)
    entry = regs.of(kind).get(name)
    return check_entry(regs, kind, entry, entry.origin or _distribution(pm, entry.plugin), options)


def plugin_info(pm: ThaliPluginManager, plugin_name: str) -> PluginInfo:
    """The loaded plugin ``plugin_name``; a :class:`~thali.core.ConfigError` listing the closest names."""
    infos = pm.plugins()
    for info in infos:
        if info.name == plugin_name:
            return info
    names = [i.name for i in infos]
    close = closest_names(plugin_name, names)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"loaded: {', '.join(names)}"
    raise ConfigError(f"no plugin {plugin_name!r} is loaded; {hint}")


def check_plugin(pm: ThaliPluginManager, plugin_name: str, *, kind: str | None = None) -> list[CheckResult]:
    """Run the checks of every component plugin ``plugin_name`` registered (optionally of one ``kind``),
    with default options. Results name the plugin's distribution and version."""
    info = plugin_info(pm, plugin_name)
    if kind is not None:
        pm.registries.of(kind)  # validates the kind name
    results: list[CheckResult] = []
    for k in COMPONENT_KINDS:
        if kind not in (None, k):
            continue
        for name in info.components.get(k, []):
            entry = pm.registries.of(k).get(name)
            results += check_entry(pm.registries, k, entry, describe(info), {})
    return results


def check_all(pm: ThaliPluginManager, *, kind: str | None = None) -> list[CheckResult]:
    """Run the checks of every component of every loaded plugin (optionally of one ``kind``)."""
    results: list[CheckResult] = []
    for info in pm.plugins():
        results += check_plugin(pm, info.name, kind=kind)
    return results
