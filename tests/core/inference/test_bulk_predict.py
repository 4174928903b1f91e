"""``thali predict`` (issue 30, the local engine): rows equal the server's /v1 answers for the same
package; a broken and an oversize photo are error rows; ``--resume`` after a SIGKILL completes without
duplicates; a source on moto S3; CSV, JSONL and Parquet hold the same rows; nothing but the output is
written."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from api_support import Server, jpeg
from helpers import thali_command

from thali.core.inference.bulk import list_sources, predict


def photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    colours = ("red", "green", "blue")
    paths = []
    for i in range(count):
        path = folder / colours[i % 3] / f"{i:04d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(jpeg(colours[i % 3], seed=i))
        paths.append(path)
    return paths


def oversize_jpeg() -> bytes:
    """A small JPEG whose header declares 7,000 x 7,000 pixels (over the 40 MP cap)."""
    data = bytearray(jpeg("red"))
    at = bytes(data).index(b"\xff\xc0")
    data[at + 5 : at + 9] = (7000).to_bytes(2, "big") + (7000).to_bytes(2, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def package(api_registry: Path) -> Any:
    from thali.registry import ModelRegistry

    return ModelRegistry(api_registry).resolve("tiny", "production")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_rows_equal_the_servers_answers_and_bad_photos_are_error_rows(
    server: Server, package: Any, registries: Any, tmp_path: Path
) -> None:
    paths = photos(tmp_path / "in", 9)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a photo")
    (tmp_path / "in" / "huge.jpg").write_bytes(oversize_jpeg())
    before = {p for p in tmp_path.rglob("*")}
    summary = predict(
        package,
        registries,
        [str(tmp_path / "in")],
        tmp_path / "out.csv",
        variant="int8",
        top_k=3,
        progress=False,
    )
    assert summary["photos"] == 11 and summary["errors"] == 2
    assert {p for p in tmp_path.rglob("*")} - before == {tmp_path / "out.csv"}  # nothing else is written
    rows = {r["path"]: r for r in read_csv(tmp_path / "out.csv")}
    assert "pixels" in rows[str(tmp_path / "in" / "huge.jpg")]["error"]
    assert rows[str(tmp_path / "in" / "broken.jpg")]["error"]
    for path in paths:
        row = rows[str(path)]
        answer = server.post(
            "/v1/domains/tiny/predict", files={"image": ("p.jpg", path.read_bytes())}, params={"top_k": 3}
        ).json()
        assert answer["version"] == int(row["model_version"]) and answer["variant"] == row["variant"]
        for i, top in enumerate(answer["predictions"], 1):
            assert row[f"top{i}_label"] == top["label"]
            assert abs(float(row[f"top{i}_probability"]) - top["probability"]) < 1e-5
        assert row["unknown"] == str(answer["unknown"]) and not row["error"]
        assert abs(float(row["unknown_score"]) - answer["unknown_score"]) < 1e-4


def test_jsonl_and_parquet_hold_the_csv_rows(package: Any, registries: Any, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    photos(tmp_path / "in", 7)
    sources = [str(tmp_path / "in")]
    for name in ("a.csv", "a.jsonl", "a.parquet"):
        predict(
            package,
            registries,
            sources,
            tmp_path / name,
            variant="int8",
            top_k=2,
            batch_size=3,
            progress=False,
        )
    as_csv = read_csv(tmp_path / "a.csv")
    as_jsonl = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    as_parquet = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert not (tmp_path / "a.parquet.parts").exists()
    assert [r["path"] for r in as_csv] == [r["path"] for r in as_jsonl] == [r["path"] for r in as_parquet]
    assert (
        [r["top1_label"] for r in as_jsonl]
        == [r["top1_label"] for r in as_parquet]
        == [r["top1_label"] for r in as_csv]
    )
    with pytest.raises(Exception, match="exists: pass --resume"):
        predict(package, registries, sources, tmp_path / "a.csv", variant="int8", progress=False)


def test_resume_after_a_sigkill_completes_without_duplicates(api_registry: Path, tmp_path: Path) -> None:
    paths = photos(tmp_path / "in", 600)
    out = tmp_path / "out.jsonl"
    command = [
        *thali_command(), "predict", "tiny@production", str(tmp_path / "in"), "--registry", str(api_registry),
        "--out", str(out), "--batch-size", "4", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "THALI_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if out.is_file() and out.read_text().count("\n") >= 40:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    partial = out.read_text().count("\n")
    assert 40 <= partial < len(paths)
    result = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already there" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(paths) and len({r["path"] for r in rows}) == len(paths)
    assert all(r["error"] is None and r["top1_label"] for r in rows)


def test_a_source_on_moto_s3(
    s3_endpoint: dict[str, Any], package: Any, registries: Any, tmp_path: Path
) -> None:
    import fsspec

    options = {"endpoint_url": s3_endpoint["endpoint_url"]}
    prefix = f"models/bulk-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("s3", **options)
    for i, colour in enumerate(("red", "green", "blue", "red")):
        fs.pipe_file(f"{prefix}/day1/{i}.jpg", jpeg(colour, seed=50 + i))
    fs.pipe_file(f"{prefix}/day1/notes.txt", b"not a photo, not listed")
    listed = list_sources([f"s3://{prefix}/"], options)
    assert listed == [f"s3://{prefix}/day1/{i}.jpg" for i in range(4)]
    summary = predict(
        package,
        registries,
        [f"s3://{prefix}/"],
        tmp_path / "s3.csv",
        variant="int8",
        storage_options=options,
        progress=False,
    )
    rows = read_csv(tmp_path / "s3.csv")
    assert summary["photos"] == 4 and summary["errors"] == 0
    assert [r["top1_label"] for r in rows] == ["red", "green", "blue", "red"]


def test_lists_globs_and_the_ray_engine_without_its_extra(api_registry: Path, tmp_path: Path) -> None:
    paths = photos(tmp_path / "in", 6)
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in paths[:3]) + "\n")
    assert list_sources([str(tmp_path / "list.txt"), str(tmp_path / "in" / "red" / "*.jpg")]) == [
        *map(str, paths[:3]),
        str(paths[3]),
    ]
    # a serving install without the ray extra (ray made unimportable here, whether installed or not)
    hidden = (
        "import sys; sys.modules['ray'] = None; from thali.core.cli.main import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    ray = [
        sys.executable,
        "-c",
        hidden,
        "predict",
        "tiny",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "x.csv"),
    ]
    result = subprocess.run([*ray, "--engine", "ray"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "pip install 'thali[ray]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.csv").exists()
    nowhere = [sys.executable, "-m", "thali.core.cli", "predict", "tiny", str(tmp_path / "nowhere")]
    result = subprocess.run(
        [*nowhere, "--registry", str(api_registry), "--out", str(tmp_path / "y.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "THALI_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode != 0 and "no such folder" in result.stderr and not (tmp_path / "y.csv").exists()


def test_the_local_ray_engine_gives_the_local_engines_rows(
    api_registry: Path, package: Any, tmp_path: Path
) -> None:
    """Ray Data on a local Ray of 2 CPUs (2 actors x 1 CPU): the same rows as the local engine."""
    pytest.importorskip("ray.data", reason="the ray extra is not installed")
    import pyarrow.parquet as pq

    photos(tmp_path / "in", 24)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    env = {**os.environ, "THALI_CACHE": str(tmp_path / "cache")}
    base = [
        *thali_command(),
        "predict",
        "tiny@production",
        str(tmp_path / "in"),
        "--registry",
        str(api_registry),
    ]
    for out, extra in ((local, []), (on_ray, ["--engine", "ray", "--threads", "1", "--batch-size", "5"])):
        result = subprocess.run(
            [*base, "--out", str(out), "--no-progress", *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert "2 actor(s) x 1 CPU" in result.stdout + result.stderr
    by_path = {r["path"]: r for r in pq.read_table(local).to_pylist()}
    ray_rows = pq.read_table(on_ray).to_pylist()
    assert len(ray_rows) == len(by_path) == 25 and not (tmp_path / "ray.parquet.parts").exists()
    for row in ray_rows:
        expected = by_path[row["path"]]
        assert row["top1_label"] == expected["top1_label"] and row["unknown"] == expected["unknown"]
        assert (row["error"] is None) == (expected["error"] is None)
        if row["top1_probability"] is not None:
            assert abs(row["top1_probability"] - expected["top1_probability"]) < 1e-6
