"""The model registry on a local folder, fsspec's memory store and a real S3 endpoint (moto's server on
127.0.0.1 through s3fs): publish / resolve / promote, aliases, integrity, concurrency, atomicity."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import thali_command
from registry_fixtures import store_url

from thali.core.errors import ConfigError, IntegrityError, ModelRegistryError, NotFoundError
from thali.registry import ModelRegistry

DOMAIN = "tiny"


def test_publish_resolve_promote_round_trip(store: ModelRegistry, tiny_export: Path) -> None:
    import onnxruntime as ort

    first = store.publish(tiny_export, aliases=["staging"])
    second = store.publish(tiny_export)
    assert (first["domain"], first["version"], second["version"]) == (DOMAIN, 1, 2)
    assert store.domains() == [DOMAIN] and store.versions(DOMAIN) == [1, 2]
    assert store.aliases(DOMAIN) == {"staging": 1}

    assert store.promote(DOMAIN, 2, "production") == 2
    package = store.resolve(DOMAIN, "production")
    assert package.version == 2 and package.aliases == ["production"]
    assert package.class_names == ["blue", "green", "red"]
    assert set(package.variants) == {"fp32", "int8"} and package.preprocess["input_size"] == [3, 32, 32]
    assert {"temperature", "unknown_threshold"} <= set(package.calibration)
    card = package.manifest
    assert card.version == 2 and card.variants["int8"].gate is not None and card.variants["int8"].gate.passed
    assert len(card.dataset.fingerprint or "") == 64 and card.licence
    assert card.domain == DOMAIN and card.lineage.checkpoint_sha256 and card.lineage.run_id == "run"
    assert card.thali_version and card.published_at
    assert set(package.files) == {
        "model.onnx",
        "model.int8.onnx",
        "labels.json",
        "preprocess.json",
        "calibration.json",
        "card.json",
    }  # fmt: skip; each verified against checksums.json
    session = ort.InferenceSession(str(package.model_path("int8")), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "logits"
    assert store.resolve(DOMAIN, "latest").version == 2 and store.resolve(DOMAIN, 1).aliases == ["staging"]

    with pytest.raises(ModelRegistryError, match="alias staging points to"):
        store.remove(DOMAIN, 1)
    store.promote(DOMAIN, 2, "staging")
    assert store.remove(DOMAIN, 1) == 1 and store.versions(DOMAIN) == [2]
    assert store.publish(tiny_export)["version"] == 3
    store.remove(DOMAIN, 3)
    assert store.publish(tiny_export)["version"] == 4, "a removed number is never given out again"

    with pytest.raises(NotFoundError, match=r"no alias 'prod'.*production"):
        store.resolve(DOMAIN, "prod")
    with pytest.raises(NotFoundError, match="no version 7"):
        store.promote(DOMAIN, 7, "production")
    with pytest.raises(ConfigError, match="alias 'Bad Name'"):
        store.promote(DOMAIN, 2, "Bad Name")
    with pytest.raises(NotFoundError, match="no model of domain 'food'"):
        store.resolve("food", "latest")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_file_is_refused(damage: str, tmp_path: Path, tiny_export: Path) -> None:
    store = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "cache")
    store.publish(tiny_export, aliases=["production"])
    target = tmp_path / "registry" / DOMAIN / "versions" / "1" / "model.onnx"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-100]))
    else:
        target.unlink()
    expected = "is missing" if damage == "delete" else "does not match its checksum"
    with pytest.raises(IntegrityError, match=rf"tiny v1: model.onnx {expected}"):
        store.resolve(DOMAIN, "production")


def test_a_model_changed_after_export_is_not_published(tmp_path: Path, tiny_export: Path) -> None:
    import shutil

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    with open(export / "model.int8.onnx", "ab") as handle:
        handle.write(b"\0")
    store = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "cache")
    with pytest.raises(ModelRegistryError, match=r"model\.int8\.onnx is not the file `thali export` wrote"):
        store.publish(export)
    assert store.versions(DOMAIN) == [] and store.publish(tiny_export)["version"] == 1  # no number used up


def test_a_flipped_byte_on_s3_is_refused(
    s3_endpoint: dict[str, Any], tmp_path: Path, tiny_export: Path
) -> None:
    url, options = store_url("s3", tmp_path, s3_endpoint)
    store = ModelRegistry(url, storage_options=options, cache_dir=tmp_path / "cache")
    store.publish(tiny_export)
    store.resolve(DOMAIN, 1)  # fills the local cache with verified files
    key = store._path(DOMAIN, "versions", 1, "model.onnx")
    data = bytearray(store.fs.cat_file(key))
    data[100] ^= 0x80
    store.fs.pipe_file(key, bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.onnx does not match its checksum"):
        store.resolve(DOMAIN, 1)


def _shared_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, dict, dict]:
    """A store several processes can reach: its URL, storage options, and the environment for them."""
    s3 = request.getfixturevalue("s3_endpoint") if kind == "s3" else None
    url, options = store_url(kind, tmp_path, s3)
    return url, options, {"THALI_REGISTRY_OPTIONS": json.dumps(options), **(s3["env"] if s3 else {})}


def _publisher(url: str, export: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*thali_command(), "publish", str(export), "--registry", url, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_publishers_get_distinct_versions(
    kind: str, tmp_path: Path, tiny_export: Path, request
) -> None:
    url, options, env = _shared_store(kind, tmp_path, request)
    processes = [_publisher(url, tiny_export, env) for _ in range(4)]
    versions = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        versions.append(json.loads(out)["version"])
    assert sorted(versions) == [1, 2, 3, 4]
    store = ModelRegistry(url, storage_options=options, cache_dir=tmp_path / "cache")
    assert store.versions(DOMAIN) == [1, 2, 3, 4]
    for version in versions:
        assert store.resolve(DOMAIN, version).version == version


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_reader_polling_during_publishes_never_sees_a_partial_version(
    kind: str, tmp_path: Path, tiny_export: Path, request
) -> None:
    url, options, env = _shared_store(kind, tmp_path, request)
    reader = ModelRegistry(url, storage_options=options, cache_dir=tmp_path / "cache")
    publishers = [_publisher(url, tiny_export, env) for _ in range(3)]
    polls, seen = 0, set()
    while any(p.poll() is None for p in publishers) or polls == 0:
        for version in reader.versions(DOMAIN):
            package = reader.resolve(DOMAIN, version)  # raises if any file were missing or partial
            assert package.version == version and len(package.files) == 6
            seen.add(version)
        polls += 1
    for p in publishers:
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    assert reader.versions(DOMAIN) == [1, 2, 3]
    assert polls > 3


def test_registry_cli(tmp_path: Path, tiny_export: Path) -> None:
    from helpers import thali_in_process

    env = {"THALI_REGISTRY": str(tmp_path / "registry")}
    published = thali_in_process("publish", str(tiny_export), "--alias", "staging", env=env)
    assert published.returncode == 0 and "published tiny v1 (alias staging)" in published.stdout
    assert thali_in_process("publish", str(tiny_export), env=env).returncode == 0
    promoted = thali_in_process("registry", "promote", "tiny", "2", "--alias", "production", env=env)
    assert promoted.stdout.strip() == "tiny: production -> v2"
    listing = thali_in_process("registry", "list", env=env)
    assert listing.stdout.strip() == "tiny: v1 (staging)  v2 (production)"
    shown = json.loads(thali_in_process("registry", "show", "tiny", "production", "--json", env=env).stdout)
    assert (
        shown["version"] == 2 and shown["aliases"] == ["production"] and "model.int8.onnx" in shown["files"]
    )
    refused = thali_in_process("registry", "rm", "tiny", "2", env=env)
    assert refused.returncode != 0 and refused.stderr.startswith("error: tiny v2 is what alias production")
    missing = thali_in_process("registry", "show", "tiny", "9", env=env)
    assert (
        missing.returncode != 0 and "versions: 1, 2" in missing.stderr and "Traceback" not in missing.stderr
    )
    assert thali_in_process("registry", "promote", "tiny", "2", "--alias", "staging", env=env).returncode == 0
    removed = thali_in_process("registry", "rm", "tiny", "1", "--registry", str(tmp_path / "registry"))
    assert removed.returncode == 0 and removed.stdout.strip() == "removed tiny v1"
    not_export = thali_in_process("publish", str(tmp_path), env=env)
    assert not_export.returncode != 0 and "not an export" in not_export.stderr


def _claim_at_once(root: str, barrier: Any, results: Any) -> None:
    registry = ModelRegistry(root)
    barrier.wait()  # all processes ask for a number at the same moment
    results.put(registry._claim(DOMAIN))


def test_simultaneous_claims_on_a_disk_get_distinct_numbers(tmp_path: Path) -> None:
    """The race the CLI-level test only hits now and then: fsspec's check-then-write "create" gave
    a duplicate number in 22 of 30 such rounds; O_EXCL gives none."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        root = str(tmp_path / f"registry{round_}")
        barrier, results = context.Barrier(6), context.Queue()
        processes = [context.Process(target=_claim_at_once, args=(root, barrier, results)) for _ in range(6)]
        for process in processes:
            process.start()
        numbers = sorted(results.get(timeout=60) for _ in processes)
        for process in processes:
            process.join(timeout=60)
        assert numbers == [1, 2, 3, 4, 5, 6], f"round {round_}: {numbers}"
