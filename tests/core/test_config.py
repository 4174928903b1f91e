from __future__ import annotations

from pathlib import Path

import pytest

from thali.core import ConfigError, build_plugin_manager, check_components, load_config

GOOD = """\
name: shelf
classes:
  - {name: cereal}
  - {name: soap, display_name: Soap bar}
model:
  backbone: tf_efficientnet_lite0
training:
  epochs: 5
"""


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "domain.yaml"
    path.write_text(GOOD)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "domain.yaml"
    path.write_text(text)
    return path


def test_defaults_are_filled(good_file: Path) -> None:
    config = load_config(good_file)
    assert config.classes[0].display_name == "Cereal"
    assert config.training.epochs == 5 and config.training.batch_size == 32
    assert config.loss.name == "cross_entropy"


def test_unknown_field_is_named_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  epochs: 5", "  epochs: 5\n  batchsize: 8"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:9: training.batchsize: unknown field")
    assert info.value.errors == {"training.batchsize": info.value.errors["training.batchsize"]}


def test_wrong_type_says_what_was_expected(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("epochs: 5", "epochs: lots"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:8: training.epochs: Input should be a valid integer" in str(info.value)
    assert "(got 'lots')" in str(info.value)


def test_nested_list_field_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("{name: cereal}", "{name: Cereal Box}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:3: classes[0].name: String should match pattern" in str(info.value)


def test_duplicate_class_and_missing_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"classes: Value error, class 'soap' is listed twice"):
        load_config(write(tmp_path, GOOD.replace("{name: cereal}", "{name: soap}")))
    with pytest.raises(ConfigError, match=r"name: required field is missing"):
        load_config(write(tmp_path, GOOD.replace("name: shelf\n", "")))


def test_overrides_apply(good_file: Path) -> None:
    config = load_config(
        good_file,
        [
            "training.epochs=3",
            "optimizer.lr=3e-4",
            "classes.0.display_name=Cereal box",
            "model.attention=[{name: se}]",
            "training.early_stopping.enabled=false",
        ],
    )
    assert config.training.epochs == 3
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.classes[0].display_name == "Cereal box"
    assert config.model.attention[0].name == "se" and config.model.attention[0].where == "head"
    assert config.training.early_stopping.enabled is False


def test_bad_overrides_name_the_field(good_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(good_file, ["training.epoch=3"])
    assert "training.epoch: unknown field" in str(info.value) and "(from --set)" in str(info.value)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(good_file, ["training.epochs"])
    with pytest.raises(ConfigError, match=r"training.epochs: Input should be greater than or equal"):
        load_config(good_file, ["training.epochs=0"])


def test_unknown_component_names_the_field(good_file: Path) -> None:
    pm = build_plugin_manager(autoload=False)
    config = load_config(good_file, ["model.backbone=efficentnet_lite0"])
    with pytest.raises(ConfigError) as info:
        check_components(config, pm.registries)
    assert "model.backbone: unknown backbone 'efficentnet_lite0'" in str(info.value)
    assert "did you mean 'tf_efficientnet_lite0'" in str(info.value)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
