"""``thali export`` and ``thali bench`` against hostile or broken input: an ``--out`` that is not an
export, a killed export's leftovers, exporters (plugins) that raise, an export folder that points at a
checkpoint it was not made from, a plugin factory that rejects config parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import thali_in_process, write_tiny_domain

from thali.core import build_plugin_manager, hookimpl
from thali.core.errors import PluginError
from thali.core.export import ExportContext
from thali.core.exporting.pipeline import STAGING_PREFIX, export_run


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_out_refuses_a_folder_that_is_not_an_export(tmp_path: Path, tiny_run: Path) -> None:
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("my notes")
    result = thali_in_process("export", str(tiny_run), "--out", str(home), "--no-progress")
    assert (
        result.returncode == 2 and "is not an export folder" in result.stderr and "notes.txt" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert (home / "notes.txt").read_text() == "my notes" and (home / "photos").is_dir()
    fake = tmp_path / "fake"  # export.json alone does not make a folder an export
    fake.mkdir()
    (fake / "export.json").write_text("{}")
    (fake / "thesis.pdf").write_bytes(b"%PDF")
    assert thali_in_process("export", str(tiny_run), "--out", str(fake)).returncode == 2
    assert (fake / "thesis.pdf").is_file()


def test_a_killed_exports_staging_folder_is_swept(tmp_path: Path, tiny_run: Path, registries: Any) -> None:
    out = tmp_path / "exports" / "tiny"
    out.parent.mkdir()
    dead = out.parent / f"{STAGING_PREFIX}{_dead_pid()}-abc"
    (dead / "package").mkdir(parents=True)
    (dead / "package" / "model.onnx").write_bytes(b"half an export")
    alive = out.parent / f"{STAGING_PREFIX}{os.getpid()}-running"  # another export still at work
    alive.mkdir()
    export_run(tiny_run, registries, out_dir=out, overrides=["export.variants=[fp32]"], progress=False)
    assert not dead.exists() and alive.is_dir() and (out / "model.onnx").is_file()
    # a second export into the same folder replaces it whole and leaves nothing beside it
    export_run(tiny_run, registries, out_dir=out, overrides=["export.variants=[fp32]"], progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([alive.name, "tiny"])


class RaisingExporter:
    produces = "raising"

    def run(self, context: ExportContext) -> dict[str, Any]:
        raise RuntimeError("quantiser crashed")


class GarbageExporter:
    """Writes a file ONNX Runtime cannot load."""

    produces = "garbage"

    def run(self, context: ExportContext) -> dict[str, Any]:
        path = context.out_dir / "model.garbage.onnx"
        path.write_bytes(b"not a model")
        context.artifacts["garbage"] = path
        return {}


class BrokenPlugin:
    @hookimpl
    def thali_register_exporters(self, registry: Any) -> None:
        registry.add("raising", RaisingExporter)
        registry.add("garbage", GarbageExporter)
        registry.add("unbuildable", lambda: 1 / 0)


def test_a_failing_exporter_costs_its_variant_not_the_export(tmp_path: Path, tiny_run: Path) -> None:
    registries = build_plugin_manager(autoload=False, plugins=[("broken", BrokenPlugin())]).registries
    out = tmp_path / "export"
    report = export_run(
        tiny_run,
        registries,
        out_dir=out,
        overrides=["export.variants=[fp32, raising, garbage, unbuildable, int8]"],
        progress=False,
    )
    assert set(report["variants"]) == {"fp32", "int8"}
    reasons = {name: " ".join(info["reasons"]) for name, info in report["rejected"].items()}
    assert "plugin 'broken'" in reasons["raising"] and "RuntimeError: quantiser crashed" in reasons["raising"]
    assert "ONNX Runtime could not run it" in reasons["garbage"]
    assert "plugin 'broken'" in reasons["unbuildable"] and "ZeroDivisionError" in reasons["unbuildable"]
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file()
    assert not list(out.glob("model.raising*")) and not list(out.glob("model.garbage*"))


class BrokenOnnx:
    """The onnx step replaced by one that raises (the built-in module is blocked)."""

    @hookimpl
    def thali_register_exporters(self, registry: Any) -> None:
        from thali.plugins.exporter_onnx import OrtOptimize

        registry.add("onnx", RaisingExporter)
        registry.add("ort_optimize", OrtOptimize)


def test_a_failing_fp32_step_is_one_error_naming_the_plugin(tmp_path: Path, tiny_run: Path) -> None:
    registries = build_plugin_manager(
        autoload=False, block=["thali.plugins.exporter_onnx"], plugins=[("broken_onnx", BrokenOnnx())]
    ).registries
    with pytest.raises(PluginError, match=r"export step 'onnx' failed: .*plugin 'broken_onnx'.*RuntimeError"):
        export_run(tiny_run, registries, out_dir=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_bench_follows_lineage_only_to_the_checkpoint_it_was_made_from(
    tmp_path: Path, tiny_export: Path, tiny_run: Path
) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    other = tmp_path / "other_run"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("export*", "exported", "damaged"))
    with open(other / "best.pt", "ab") as handle:  # not the checkpoint the export was made from
        handle.write(b"\0")
    result = thali_in_process(
        "bench", str(export), "--run", str(other), "--synthetic", "--json", "--no-progress", "--batch", "4",
        "--latency-runs", "2", "--throughput-runs", "1", "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    assert not [r for r in bench["rows"] if r["engine"] != "onnxruntime"]
    assert any("is not the checkpoint this export was made from" in n for n in bench["notes"])


def test_a_plugin_factory_that_rejects_config_params_is_one_line(tmp_path: Path, tiny_data: Path) -> None:
    config = write_tiny_domain(tmp_path / "cfg")
    result = thali_in_process(
        "train", str(config), "--data", str(tiny_data), "--set", "dataset.params.foo=1",
        "--run-dir", str(tmp_path / "run"), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: dataset 'imagefolder' (plugin 'thali.plugins.datasets', thali ")
    assert "foo" in line and "Traceback" not in result.stderr
