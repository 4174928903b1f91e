"""Checkpoints and run files against untrusted input: crafted ``.pt`` files are refused (never unpickled),
a failed resume leaves the run untouched, and every run file is written atomically."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import thali_in_process

from thali.core.errors import DataError
from thali.core.files import write_atomic
from thali.core.training import checkpoint as ckpt


class Payload:
    """Pickles as a call to ``os.system``: unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export*", "tb"))
    return run


def _craft(path: Path, marker: Path) -> None:
    torch.save({"model": Payload(marker), "state": {"epoch": 0}}, path)


def _one_error_line(stderr: str, name: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    assert name in errors[0] and "refused" in errors[0], errors[0]
    return errors[0]


def test_the_crafted_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _craft(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what thali must never do
    assert marker.exists()


def test_evaluate_refuses_a_crafted_best_pt(tmp_path: Path, tiny_run: Path, tiny_data: Path) -> None:
    run, marker = _copy_run(tiny_run, tmp_path), tmp_path / "pwned"
    _craft(run / "best.pt", marker)
    result = thali_in_process("evaluate", str(run), "--data", str(tiny_data), "--no-progress")
    assert result.returncode != 0
    line = _one_error_line(result.stderr, "best.pt")
    assert "os.system" in line or "posix.system" in line
    assert not marker.exists()


def test_export_and_load_run_refuse_a_crafted_best_pt(
    tmp_path: Path, tiny_run: Path, registries: object
) -> None:
    from thali.core.exporting.pipeline import export_run
    from thali.core.training.evaluate import load_run

    run, marker = _copy_run(tiny_run, tmp_path), tmp_path / "pwned"
    _craft(run / "best.pt", marker)
    with pytest.raises(DataError, match=r"best\.pt: refused"):
        load_run(run, registries)  # what `thali bench` uses for its torch rows
    with pytest.raises(DataError, match=r"best\.pt: refused"):
        export_run(run, registries, out_dir=tmp_path / "export", progress=False)
    assert not marker.exists() and not (tmp_path / "export" / "model.onnx").exists()


def test_resume_refuses_a_crafted_last_pt_and_keeps_config(
    tmp_path: Path, tiny_run: Path, tiny_data: Path
) -> None:
    run, marker = _copy_run(tiny_run, tmp_path), tmp_path / "pwned"
    _craft(run / "last.pt", marker)
    config = (run / "config.yaml").read_bytes()
    result = thali_in_process(
        "train", "tiny", "--resume", "--run-dir", str(run), "--data", str(tiny_data), "--no-progress",
        "--set", "training.epochs=8",
    )  # fmt: skip
    assert result.returncode != 0
    _one_error_line(result.stderr, "last.pt")
    assert not marker.exists()
    assert (run / "config.yaml").read_bytes() == config
    with pytest.raises(DataError, match=r"last\.pt: refused"):
        ckpt.load(run / "last.pt", ckpt.LAST_KEYS)
    assert not marker.exists()


@pytest.mark.parametrize(
    "override",
    [
        "model.params={width: 8, num_stages: 3, input_size: 32}",  # valid, but last.pt does not fit
        "training.no_such_field=1",
        "training.epochs=0",
    ],
)
def test_a_failed_resume_leaves_config_yaml_byte_identical(
    tmp_path: Path, tiny_run: Path, tiny_data: Path, override: str
) -> None:
    run = _copy_run(tiny_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = thali_in_process(
        "train", "tiny", "--resume", "--run-dir", str(run), "--data", str(tiny_data), "--no-progress",
        "--set", override,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if override.startswith("model."):
        assert (
            "last.pt: the weights do not fit this model" in result.stderr and "size mismatch" in result.stderr
        )
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before


def test_checkpoints_of_a_run_load_with_weights_only(tiny_run: Path) -> None:
    for name in ("best.pt", "last.pt"):
        saved = torch.load(tiny_run / name, map_location="cpu", weights_only=True)
        assert saved["classes"] == ["blue", "green", "red"]
    last = ckpt.load(tiny_run / "last.pt", ckpt.LAST_KEYS)
    assert last["state"]["epoch"] == 6 and len(last["state"]["history"]) == 6
    assert all(type(v) in (int, float) for record in last["state"]["history"] for v in record.values())
    assert not list(tiny_run.rglob("*.tmp"))


def test_every_part_round_trips_under_weights_only(tmp_path: Path) -> None:
    from thali.core.config import ScheduleConfig
    from thali.core.training.optim import ModelEma, build_scheduler

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="cosine"), 3, 2, 0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    parts = ckpt.TrainingParts(model, optimizer, scheduler, scaler, ModelEma(model, 0.9))
    for _ in range(2):
        scaler.scale(model(torch.randn(5, 4)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        parts.ema.update(model)
    state = {"epoch": 2, "best": np.float32(0.5), "best_epoch": np.int64(2), "bad_epochs": 0, "history": []}
    state["history"].append({"val_top1": np.float64(0.25), "cm": np.eye(2)})
    ckpt.seed_everything(3)
    parts.save(tmp_path / "last.pt", state, classes=["a", "b"], preprocess={"input_size": (3, 8, 8)})
    draws = (random.random(), np.random.rand(), torch.rand(1))

    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["state"]["best"] == 0.5 and type(saved["state"]["best_epoch"]) is int
    assert saved["state"]["history"][0]["cm"] == [[1.0, 0.0], [0.0, 1.0]]
    assert saved["preprocess"] == {"input_size": (3, 8, 8)}

    ckpt.seed_everything(99)
    copy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    optimizer2 = torch.optim.AdamW(copy.parameters(), lr=0.01)
    scheduler2 = build_scheduler(optimizer2, ScheduleConfig(name="cosine"), 3, 2, 0.01)
    scaler2 = torch.amp.GradScaler("cpu", enabled=True)
    parts2 = ckpt.TrainingParts(copy, optimizer2, scheduler2, scaler2, ModelEma(copy, 0.9))
    restored = parts2.restore(tmp_path / "last.pt")
    assert restored["epoch"] == 2 and restored["best"] == 0.5
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(1), draws[2])
    mine, theirs = model.state_dict(), copy.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in mine.items())
    assert scheduler2.last_epoch == scheduler.last_epoch and scaler2.get_scale() == scaler.get_scale()
    assert parts2.ema.updates == 2
    a, b = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_odd_files_are_refused_with_one_line(tmp_path: Path) -> None:
    cases = {
        "empty.pt": b"",
        "garbage.pt": b"garbage" * 10,
        "text.pt": b"model: not a checkpoint\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as info:
            ckpt.load(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    for name in ("list.pt", "dict.pt"):
        with pytest.raises(DataError, match="not a thali checkpoint"):
            ckpt.load(tmp_path / name)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = ckpt.TrainingParts(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None)
    torch.save({k: {} for k in ckpt.LAST_KEYS}, tmp_path / "hollow.pt")
    with pytest.raises(DataError, match=r"hollow\.pt: the weights do not fit this model"):
        parts.restore(tmp_path / "hollow.pt")
    torch.save({**{k: {} for k in ckpt.LAST_KEYS}, "model": model.state_dict()}, tmp_path / "hollow.pt")
    with pytest.raises(DataError, match=r"hollow\.pt: cannot resume from this checkpoint"):
        parts.restore(tmp_path / "hollow.pt")


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.ones(2)}}, target)
    old = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any failure of the pickler will do
        ckpt.save_atomic({"model": {"w": lambda: 0}}, target)  # a lambda cannot be pickled
    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]  # fails in the middle of the write
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    write_atomic(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
