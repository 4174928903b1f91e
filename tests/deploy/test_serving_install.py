"""The serving install (``pip install thali``, no extra) in a fresh environment built the way the
Dockerfile builds it: no torch in it, the REST service predicts with no torch module loaded, the
commands that need no training work, and a training command names the extra it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

TRAINING_STACK = ("torch", "torchvision", "timm", "albumentations", "tensorboard", "onnx", "onnxscript")


def _run(venv: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THALI_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(kwargs.pop("env", {}))  # type: ignore[arg-type]
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kwargs,
    )  # type: ignore[call-overload]


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def test_the_serving_install_has_no_training_stack_and_is_a_fraction_of_the_full_one(
    image_venv: Path,
) -> None:
    listed = json.loads(_run(image_venv, "pip", "list", "--format=json").stdout)
    names = {d["name"].lower() for d in listed}
    assert "thali" in names and "onnxruntime" in names and "streamlit" in names
    assert not names & set(TRAINING_STACK), names & set(TRAINING_STACK)
    serving, full = _size_mb(image_venv), _size_mb(Path(sys.prefix))
    print(f"serving environment {serving:.0f} MB, full (dev) environment {full:.0f} MB")
    assert serving < full / 3


def test_import_thali_api_and_predict_with_no_torch_module_loaded(image_venv: Path, tmp_path: Path) -> None:
    script = f"""
import io, json, sys
import numpy as np
from PIL import Image
from thali.api import create_app
from thali.api.settings import Settings

app = create_app(Settings(registry={str(REPO / "models")!r}))
buffer = io.BytesIO()
Image.fromarray(np.full((96, 128, 3), (200, 120, 40), np.uint8)).save(buffer, "JPEG")
client = app.test_client()
upload = {{"image": (io.BytesIO(buffer.getvalue()), "a.jpg")}}
answer = client.post("/v1/domains/south_asian_food/predict", data=upload)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {TRAINING_STACK!r})
print(json.dumps({{"status": answer.status_code, "body": answer.get_json(), "heavy": heavy}}))
"""
    done = _run(image_venv, "python", "-c", script, env={"THALI_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 200 and len(result["body"]["predictions"]) == 5, result
    assert result["heavy"] == []


def test_training_commands_name_the_extra_they_need(image_venv: Path, tmp_path: Path) -> None:
    for command in (["train", "south_asian_food"], ["export", str(tmp_path)], ["evaluate", str(tmp_path)]):
        if command[0] == "evaluate":
            command += ["--data", str(tmp_path)]
        done = _run(image_venv, "thali", *command)
        assert done.returncode == 4, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'thali[train]'" in lines[0], (command, done.stderr)
        assert "Traceback" not in done.stderr


def test_bench_publish_and_evaluate_work_without_torch(
    image_venv: Path, tiny_export: Path, tiny_data: Path, tmp_path: Path
) -> None:
    bench = _run(
        image_venv, "thali", "bench", str(tiny_export), "--latency-runs", "2", "--throughput-runs", "1",
        "--batch", "4", "--no-progress", "--out", str(tmp_path / "bench"),
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"fp32", "int8"} and all(
        r["engine"] == "onnxruntime" for r in rows
    )
    assert all(
        r["top1"] is not None and r["top1"] > 0.5 for r in rows
    )  # scored with the server's preprocessing
    assert "torch eager skipped: torch is not installed" in bench.stdout

    registry = tmp_path / "registry"
    published = _run(image_venv, "thali", "publish", str(tiny_export), "--registry", str(registry))
    assert published.returncode == 0, published.stderr
    scored = _run(
        image_venv, "thali", "evaluate", "tiny", "--registry", str(registry), "--data", str(tiny_data),
        "--json", "--no-progress", env={"THALI_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["top1"] > 0.5
