"""``thali export`` and ``thali bench`` on a real (tiny) training run: files, gate, report, bench rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import thali_in_process

from thali.core import build_plugin_manager, hookimpl
from thali.core.export import ExportContext
from thali.core.exporting.gate import gate
from thali.core.exporting.pipeline import export_run


@pytest.fixture(scope="module")
def exported(tiny_run: Path) -> dict[str, Any]:
    out = tiny_run.parent / "exported"
    result = thali_in_process("export", str(tiny_run), "--out", str(out), "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_export_writes_gated_variants_and_the_package_files(exported: dict[str, Any], tiny_run: Path) -> None:
    out = Path(exported["out_dir"])
    validation = len(json.loads((tiny_run / "split.json").read_text())["val"])
    assert exported["parity"]["top1_agreement"] == 1.0 and exported["parity"]["max_abs_logit_diff"] < 1e-3
    assert (
        exported["steps"]["ort_optimize"]["nodes_after"] <= exported["steps"]["ort_optimize"]["nodes_before"]
    )
    assert set(exported["variants"]) | set(exported["rejected"]) == {"fp32", "int8", "fp16"}
    for name, variant in exported["variants"].items():
        assert (out / variant["file"]).is_file(), name
        assert variant["metrics"]["images"] == validation  # scored on the whole validation split
        if name != "fp32":
            assert variant["gate"]["passed"] and variant["gate"]["top1_drop"] <= 1.0
    for name, info in exported["rejected"].items():
        assert info["reasons"] and not (out / f"model.{name}.onnx").exists()
    labels = json.loads((out / "labels.json").read_text())
    assert [c["name"] for c in labels["classes"]] == ["blue", "green", "red"]
    preprocess = json.loads((out / "preprocess.json").read_text())
    assert preprocess["input_size"] == [3, 32, 32] and preprocess["input_name"] == "input"
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["temperature"] > 0 and 0 < calibration["unknown_threshold"] <= 1
    meta = json.loads((out / "export.json").read_text())
    assert len(meta["lineage"]["checkpoint_sha256"]) == 64 and len(meta["dataset"]["fingerprint"]) == 64
    assert not list(out.parent.glob(".thali-export-*")), "the staging folder is removed"


class DamagedExporter:
    """A variant that negates the classifier weights: what a broken quantiser could produce."""

    produces = "damaged"

    def run(self, context: ExportContext) -> dict[str, Any]:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(context.artifacts["fp32"]))
        classifier = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
        weights = next(t for t in model.graph.initializer if t.name == classifier.input[1])
        weights.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weights), weights.name))
        path = context.out_dir / "model.damaged.onnx"
        onnx.save(model, str(path))
        context.artifacts["damaged"] = path
        return {"path": str(path)}


class DamagedPlugin:
    @hookimpl
    def thali_register_exporters(self, registry: Any) -> None:
        registry.add("damaged", DamagedExporter, description="test: a deliberately broken variant")


def test_the_gate_refuses_a_damaged_variant(tiny_run: Path) -> None:
    registries = build_plugin_manager(autoload=False, plugins=[("damaged", DamagedPlugin())]).registries
    out = tiny_run.parent / "damaged"
    report = export_run(
        tiny_run, registries, out_dir=out, overrides=["export.variants=[fp32, damaged]"], progress=False
    )
    assert "damaged" not in report["variants"] and not (out / "model.damaged.onnx").exists()
    reasons = " ".join(report["rejected"]["damaged"]["reasons"])
    assert "points below fp32" in reasons and "class" in reasons
    assert report["rejected"]["damaged"]["gate"]["passed"] is False
    assert (out / "model.onnx").is_file()  # the good model is not lost with the bad variant


def test_gate_thresholds_come_from_the_config() -> None:
    from thali.core.config import GateConfig

    def scores(top1: float, hits: dict[str, int]) -> dict[str, Any]:
        support = {"a": 20, "b": 7}
        return {
            "top1": top1,
            "per_class": {k: {"recall": hits[k] / n, "support": n} for k, n in support.items()},
        }

    reference = scores(0.90, {"a": 20, "b": 7})
    one_image = scores(0.89, {"a": 20, "b": 6})  # 14 points of a 7-image class, but a single image
    assert gate(one_image, reference, GateConfig())["passed"]
    strict = gate(one_image, reference, GateConfig(class_noise_images=0))
    assert not strict["passed"] and "class 'b' drops 14.3 points" in strict["reasons"][0]
    two_points = scores(0.88, {"a": 20, "b": 7})
    assert gate(two_points, reference, GateConfig())["reasons"][0].startswith("top-1 88.00% is 2.00 points")
    assert gate(two_points, reference, GateConfig(max_top1_drop=2.5))["passed"]


def test_bench_reports_rows_ratios_and_providers(exported: dict[str, Any], tmp_path: Path) -> None:
    result = thali_in_process(
        "bench", exported["out_dir"], "--json", "--no-progress", "--batch", "8", "--latency-runs", "3",
        "--throughput-runs", "2", "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    rows = {r["name"]: r for r in bench["rows"]}
    assert "torch eager fp32 (cpu)" in rows and "onnxruntime fp32 (CPU)" in rows
    assert rows["torch eager fp32 (cpu)"]["x_torch_eager"] == 1.0  # ratios are against plain eager
    assert rows["torch eager fp32 channels_last (cpu)"]["top1"] == rows["torch eager fp32 (cpu)"]["top1"]
    assert {r["variant"] for r in bench["rows"] if r["engine"] == "onnxruntime"} == set(exported["variants"])
    for row in bench["rows"]:
        assert row["latency_ms_p50"] > 0 and row["latency_ms_p95"] >= row["latency_ms_p50"]
        assert row["throughput_img_s"] > 0 and 0 <= row["top1"] <= 1 and row["x_torch_eager"] > 0
        if row["engine"] == "onnxruntime":
            assert row["provider_used"] == "CPUExecutionProvider" and row["file_mb"] > 0
            assert row["x_ort_fp32"] > 0
    assert rows["onnxruntime fp32 (CPU)"]["x_ort_fp32"] == 1.0
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert "x torch eager" in table and "onnxruntime fp32 (CPU)" in table
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"] == bench["rows"]


def test_export_and_bench_mistakes_are_one_line_errors(tmp_path: Path, tiny_run: Path) -> None:
    not_a_run = thali_in_process("export", str(tmp_path))
    assert not_a_run.returncode != 0 and "not a training run" in not_a_run.stderr
    assert "Traceback" not in not_a_run.stderr
    not_an_export = thali_in_process("bench", str(tmp_path))
    assert not_an_export.returncode != 0 and "not an export" in not_an_export.stderr
    unknown = thali_in_process("export", str(tiny_run), "--variants", "int9")
    assert unknown.returncode != 0 and "export.variants[0]" in unknown.stderr and "int8" in unknown.stderr
    moved = tmp_path / "moved_run"
    shutil.copytree(tiny_run, moved, ignore=shutil.ignore_patterns("export*", "exported", "damaged"))
    split = json.loads((moved / "split.json").read_text())
    split["root"] = str(tmp_path / "gone")
    (moved / "split.json").write_text(json.dumps(split))
    gone = thali_in_process("export", str(moved), "--no-progress")
    assert gone.returncode != 0 and "pass --data DIR" in gone.stderr
