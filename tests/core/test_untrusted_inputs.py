"""Hostile YAML and bad device names: one-line ConfigErrors, fast, never a traceback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import thali_in_process

from thali.core import ConfigError, load_config
from thali.core.config import parse_override, read_mapping
from thali.core.safe_yaml import MAX_YAML_BYTES, MAX_YAML_DEPTH, parse_yaml

HEAD = "name: shelf\nclasses: [{name: cereal}, {name: soap}]\n"


def billion_laughs() -> str:
    """Nine levels of nine aliases each: 9**9 (387 million) strings once expanded, in ~400 bytes."""
    lines = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def write(folder: Path, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "domain.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refused(path: Path, *match: str) -> str:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.perf_counter() - started < 5
    message = info.value.message
    assert message.startswith(str(path)) and "\n" not in message
    for text in match:
        assert text in message
    return message


def test_billion_laughs_is_refused_fast(tmp_path: Path) -> None:
    bomb = billion_laughs()
    assert len(bomb) < 500
    refused(write(tmp_path, HEAD + bomb), "more than 100,000 values", "aliases")


def test_deep_nesting_is_refused_before_recursion(tmp_path: Path) -> None:
    flow = write(tmp_path / "flow", HEAD + "x: " + "[" * 10_000 + "]" * 10_000 + "\n")
    refused(flow, f"nested deeper than the limit of {MAX_YAML_DEPTH} levels", "line 3")
    block = write(tmp_path / "block", HEAD + "x:\n" + "".join("  " * i + "- \n" for i in range(200)))
    refused(block, "nested deeper")
    mapping = write(tmp_path / "map", HEAD + "x: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n")
    refused(mapping, "nested deeper")


def test_alias_cycle_is_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, HEAD + "x: &x [1, *x]\n"), "refers to itself")


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "# " + "x" * MAX_YAML_BYTES + "\n")
    refused(path, "bytes, over the limit of 1,048,576")


def test_not_utf8_and_unreadable_files(tmp_path: Path) -> None:
    latin = write(tmp_path / "latin", "name: café\nclasses: [{name: a}, {name: b}]\n".encode("latin-1"))
    refused(latin, "not UTF-8 text", "0xe9")
    with pytest.raises(ConfigError, match="cannot read"):
        read_mapping(tmp_path)  # a folder, not a file


def test_huge_integer_is_a_config_error(tmp_path: Path) -> None:
    refused(write(tmp_path, HEAD + "training: {epochs: " + "9" * 5000 + "}\n"), "not valid YAML")


def test_presets_and_set_values_share_the_limits(tmp_path: Path) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(billion_laughs())
    with pytest.raises(ConfigError, match=r"preset\.yaml: YAML refused"):
        load_config(write(tmp_path / "d", HEAD), presets=[preset])
    with pytest.raises(ConfigError, match=r"^--set model\.params: YAML refused: line 1: nested deeper"):
        parse_override("model.params=" + "[" * 5000)
    with pytest.raises(ConfigError, match=r"^--set a\.b: not valid YAML"):
        parse_override("a.b=[1, 2")
    assert parse_override("training.epochs=3") == (["training", "epochs"], 3)


def test_ordinary_yaml_features_still_work(tmp_path: Path) -> None:
    text = HEAD + "x: &opt {lr: 0.01}\noptimizer:\n  <<: *opt\n  name: sgd\n"
    data, node = parse_yaml(text, "t")
    assert data["optimizer"] == {"lr": 0.01, "name": "sgd"} and node is not None
    assert parse_yaml("", "t") == (None, None)
    path = write(tmp_path, HEAD + "training:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"domain.yaml:4: training.epochs: "):
        load_config(path)  # line numbers still come from the composed node
    assert load_config(Path(__file__).parents[2] / "domains" / "south_asian_food" / "domain.yaml")


def test_a_large_taxonomy_fits_the_limits(tmp_path: Path) -> None:
    classes = "".join(f"  - {{name: c{i}, description: class number {i}}}\n" for i in range(3000))
    config = load_config(write(tmp_path, "name: big\nclasses:\n" + classes))
    assert len(config.classes) == 3000


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_valid_devices(tmp_path: Path, device: str) -> None:
    assert load_config(write(tmp_path, HEAD), [f"training.device={device}"]).training.device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", "cuda:x", "CPU", "cuda:0,1", "tpu"])
def test_invalid_device_names_the_field(tmp_path: Path, device: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, HEAD), [f"training.device={device}"])
    assert "training.device: " in info.value.message and "'cuda:N'" in info.value.message
    assert info.value.errors and "training.device" in info.value.errors


@pytest.mark.parametrize(
    ("command", "content", "arg", "expected"),
    [
        pytest.param("show", HEAD + billion_laughs(), "file", "more than 100,000 values", id="bomb"),
        pytest.param(
            "validate", HEAD + "x: " + "[" * 10_000 + "]" * 10_000, "folder", "nested deeper", id="deep"
        ),
        pytest.param(
            "show",
            "name: café\nclasses: [{name: a}, {name: b}]\n".encode("latin-1"),
            "file",
            "not UTF-8",
            id="latin1",
        ),
        pytest.param("validate", HEAD, "--set training.device=gpu", "training.device: ", id="device"),
    ],
)
def test_cli_prints_one_line_and_exits_2(
    tmp_path: Path, command: str, content: str | bytes, arg: str, expected: str
) -> None:
    path = write(tmp_path / "pack", content)
    args = [str(path.parent) + "/"] if arg == "folder" else [str(path)]
    if arg.startswith("--set"):
        args += arg.split(" ")
    started = time.perf_counter()
    result = thali_in_process("config", command, *args)
    assert time.perf_counter() - started < 30
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
