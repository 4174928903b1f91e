from __future__ import annotations

import pytest

from thali.core import (
    DuplicateComponentError,
    Registry,
    UnknownComponentError,
    build_plugin_manager,
    hookimpl,
)


def test_add_get_create_and_list_with_pattern() -> None:
    reg: Registry[object] = Registry("backbones")
    with reg.registering_as("tests"):
        reg.add("efficientnet_b0", lambda **kw: ("b0", kw), metadata={"input_size": (3, 224, 224)})
        reg.add("efficientnet_b1", lambda **kw: ("b1", kw))
        reg.add("resnet50", lambda **kw: ("r50", kw))
    entry = reg.get("efficientnet_b0")
    assert entry.plugin == "tests"
    assert entry.metadata["input_size"] == (3, 224, 224)
    assert reg.create("resnet50", num_classes=3) == ("r50", {"num_classes": 3})
    assert [e.name for e in reg.list("efficientnet_*")] == ["efficientnet_b0", "efficientnet_b1"]
    assert len(reg) == 3 and "resnet50" in reg
    with pytest.raises(TypeError):
        entry.metadata["input_size"] = (3, 1, 1)  # type: ignore[index]  # metadata is read-only


def test_unknown_name_lists_the_closest_names() -> None:
    reg: Registry[object] = Registry("backbones")
    for name in ("efficientnet_b0", "efficientnet_b3", "tf_efficientnet_lite0", "resnet50"):
        reg.add(name, object)
    with pytest.raises(UnknownComponentError) as info:
        reg.get("efficentnet_b3")
    message = str(info.value)
    assert "unknown backbone 'efficentnet_b3'" in message
    assert "did you mean 'efficientnet_b3'" in message
    assert info.value.errors["closest"][0] == "efficientnet_b3"
    assert "resnet50" not in info.value.errors["closest"]


class _LossPlugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def thali_register_losses(self, registry: Registry[object]) -> None:
        registry.add("cross_entropy", object, description=f"from {self.name}")


def test_duplicate_name_names_both_plugins() -> None:
    with pytest.raises(DuplicateComponentError) as info:
        build_plugin_manager(autoload=False, plugins=[("my_losses", _LossPlugin("mine"))])
    message = str(info.value)
    assert "loss 'cross_entropy' is registered twice" in message
    assert "'thali.plugins.losses'" in message and "'my_losses'" in message


def test_blocking_a_builtin_lets_a_plugin_replace_its_component() -> None:
    pm = build_plugin_manager(
        autoload=False,
        block=["thali.plugins.losses"],
        plugins=[("my_losses", _LossPlugin("mine"))],
    )
    entry = pm.registries.losses.get("cross_entropy")
    assert entry.plugin == "my_losses" and entry.description == "from mine"
    assert "thali.plugins.losses" in pm.blocked
