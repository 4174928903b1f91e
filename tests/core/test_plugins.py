"""Plugin discovery with a real third-party distribution found through its entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_thali, thali_in_process, write_demo_distribution

from thali.core import DEFAULT_PLUGINS, PluginError, build_plugin_manager, check_components, hookimpl
from thali.core.domains import resolve_domain


def test_builtins_are_plugins_with_components() -> None:
    pm = build_plugin_manager(autoload=False)
    infos = {i.name: i for i in pm.plugins()}
    assert list(infos)[: len(DEFAULT_PLUGINS)] == list(DEFAULT_PLUGINS)
    assert infos["thali.plugins.losses"].source == "builtin"
    assert "south_asian_food" in pm.registries.domains
    assert pm.registries.backbones.get("tf_efficientnet_lite0").metadata["mean"] == (0.5, 0.5, 0.5)


def test_entry_point_plugin_is_found_and_usable_by_name(demo_site: Path) -> None:
    import torch

    pm = build_plugin_manager()
    info = {i.name: i for i in pm.plugins()}["demo"]
    assert info.source == "entry-point"
    assert (info.distribution, info.version) == ("thali-demo-plugin", "0.1.0")
    assert info.components == {"losses": ["demo_l1"], "domains": ["retail_demo"]}

    loss = pm.registries.losses.create("demo_l1", num_classes=2)
    perfect = loss(torch.tensor([[20.0, -20.0]]), torch.tensor([0]))
    wrong = loss(torch.tensor([[-20.0, 20.0]]), torch.tensor([0]))
    assert float(perfect) < 1e-6 and float(wrong) == pytest.approx(2.0, abs=1e-6)

    config = resolve_domain(pm.registries, "retail_demo").load_config()
    check_components(config, pm.registries)  # its loss name resolves through the registry
    assert config.loss.name == "demo_l1"


def test_thali_plugins_lists_the_entry_point_plugin(demo_site: Path) -> None:
    result = run_thali("plugins")  # a fresh interpreter finds the distribution through its entry point
    assert result.returncode == 0, result.stderr
    assert "demo  [entry point; thali-demo-plugin 0.1.0; module thali_demo_plugin]" in result.stdout
    assert "losses: demo_l1" in result.stdout

    data = json.loads(thali_in_process("plugins", "--json").stdout)
    demo = next(p for p in data["plugins"] if p["name"] == "demo")
    assert demo["components"]["losses"] == ["demo_l1"]
    assert any(c["name"] == "demo_l1" for c in data["components"]["losses"])

    shown = thali_in_process("config", "validate", "retail_demo")
    assert shown.returncode == 0, shown.stderr
    assert "retail_demo: ok (2 classes" in shown.stdout


def test_autoload_can_be_disabled_and_plugins_blocked(demo_site: Path) -> None:
    off = thali_in_process("plugins", env={"THALI_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert off.returncode == 0 and "demo" not in off.stdout
    blocked = thali_in_process("--block-plugin", "demo", "plugins")
    assert blocked.returncode == 0
    assert "losses: demo_l1" not in blocked.stdout and "blocked: demo" in blocked.stdout
    pm = build_plugin_manager(block=["demo"])
    assert "demo_l1" not in pm.registries.losses


class _Misspelt:
    @hookimpl
    def thali_register_loses(self, registry: object) -> None:  # typo: loses
        raise AssertionError("never called")


def test_misspelt_hook_is_an_error_naming_the_right_hook() -> None:
    with pytest.raises(PluginError) as info:
        build_plugin_manager(autoload=False, plugins=[("typo_plugin", _Misspelt())])
    message = str(info.value)
    assert "'typo_plugin' implements unknown hook 'thali_register_loses'" in message
    assert "did you mean 'thali_register_losses'" in message


def test_plugin_that_fails_to_import_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = write_demo_distribution(tmp_path / "site", plugin_name="broken", package="thali_broken_plugin")
    (site / "thali_broken_plugin" / "__init__.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError) as info:
        build_plugin_manager()
    assert "plugin 'broken' failed to import" in str(info.value)
    assert "thali-demo-plugin 0.1.0" in str(info.value)
    assert "not_a_module_anywhere" in str(info.value)
