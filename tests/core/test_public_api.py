"""``thali.core`` exports the plugin API the guide documents, and nothing else."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO

import thali.core

GUIDE = REPO / "docs" / "writing-a-domain-plugin.md"


def documented_names() -> set[str]:
    text = GUIDE.read_text()
    block = text.split("<!-- plugin-api -->", 1)[1].split("<!-- /plugin-api -->", 1)[0]
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", block))


def test_thali_core_exports_exactly_the_documented_plugin_api() -> None:
    assert set(thali.core.__all__) == documented_names()
    for name in thali.core.__all__:  # and every name is really there
        assert getattr(thali.core, name) is not None, name
    internal = {"DEFAULT_PLUGINS", "ThaliPluginManager", "PluginInfo", "check_components", "hookspec"}
    assert not internal & set(thali.core.__all__)


def test_importing_the_plugin_api_loads_neither_torch_nor_numpy() -> None:
    code = "import sys, thali.core; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_packages_ship_their_types() -> None:
    for folder in ("core", "plugins", "registry", "api", "ui", "testing"):
        assert (REPO / folder / "py.typed").is_file(), folder


def test_the_inference_engine_imports_nothing_of_training() -> None:
    """Data flows one way: training may import inference and the shared modules, never the reverse
    (``thali serve`` and ``thali evaluate`` of a registry model run without the training stack)."""
    import ast

    core = REPO / "core"
    shared = [
        *sorted((core / "inference").glob("*.py")),
        core / "metrics.py",
        core / "samples.py",
        core / "manifest.py",
    ]
    offenders = []
    for path in shared:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [("." * node.level) + base]
            for name in names:
                if "training" in name.split(".") or name.lstrip(".").startswith("training"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not offenders, offenders
