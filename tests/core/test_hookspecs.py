from __future__ import annotations

import inspect
import types

import pluggy

from thali.core import hookimpl, hookspecs
from thali.core.registry import COMPONENT_KINDS


def undocumented_hooks(module: types.ModuleType) -> list[str]:
    """Hook specs of ``module`` without a docstring or without type annotations."""
    bad = []
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("thali_"):
            continue
        doc = inspect.getdoc(fn) or ""
        sig = inspect.signature(fn)
        typed = all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
        if len(doc) < 40 or not typed or sig.return_annotation is inspect.Signature.empty:
            bad.append(name)
    return bad


def test_every_hook_has_a_docstring_and_types() -> None:
    assert undocumented_hooks(hookspecs) == []


def test_the_check_catches_an_undocumented_hook() -> None:
    fake = types.ModuleType("fake_specs")

    def thali_register_things(registry):  # no docstring, no types
        pass

    fake.thali_register_things = thali_register_things
    assert undocumented_hooks(fake) == ["thali_register_things"]


def test_one_registration_hook_per_component_kind() -> None:
    names = {n for n in dir(hookspecs) if n.startswith("thali_")}
    assert names == {f"thali_register_{kind}" for kind in COMPONENT_KINDS}


def test_hookimpl_marker_is_exported_from_core() -> None:
    assert isinstance(hookimpl, pluggy.HookimplMarker)
    assert hookimpl.project_name == "thali"
