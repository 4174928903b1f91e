"""The registry against untrusted stores, export folders and names: each attack reproduced on a real
folder, ``memory://`` or moto's S3 server, and refused with a clear error, nothing written outside its
folder, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from export_support import edited_export
from helpers import thali_in_process
from registry_fixtures import store_url

from thali.core.errors import ConfigError, IntegrityError, ModelRegistryError, NotFoundError
from thali.registry import ModelRegistry
from thali.registry.package import sha256_bytes

DOMAIN = "tiny"


def _rewrite_checksums(store: ModelRegistry, version: int, change: Any) -> bytes:
    """Rewrite a stored version's checksums.json the way a writer of the bucket could."""
    key = store._path(DOMAIN, "versions", version, "checksums.json")
    record = json.loads(store.fs.cat_file(key))
    change(record["files"])
    raw = json.dumps(record).encode()
    store.fs.pipe_file(key, raw)
    return raw


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_checksum_keys_cannot_write_outside_the_cache(
    kind: str, tmp_path: Path, tiny_export: Path, request: pytest.FixtureRequest
) -> None:
    s3 = request.getfixturevalue("s3_endpoint") if kind == "s3" else None
    url, options = store_url(kind, tmp_path, s3)
    store = ModelRegistry(url, storage_options=options, cache_dir=tmp_path / "cache")
    store.publish(tiny_export)
    victim = tmp_path / "outside" / "x"
    evil_name = f"/../../../../../../../..{victim}"
    payload = b"written by a hostile store"
    store.fs.pipe_file(store._path(DOMAIN, "versions", 1, evil_name.lstrip("/")), payload)
    _rewrite_checksums(store, 1, lambda files: files.update({evil_name: sha256_bytes(payload)}))
    with pytest.raises(IntegrityError, match="not a file a model package can hold"):
        store.resolve(DOMAIN, 1)
    assert not victim.exists() and not victim.parent.exists()


def test_names_from_a_request_never_reach_the_store(tmp_path: Path, tiny_export: Path) -> None:
    store = ModelRegistry(f"memory://attack-{os.getpid()}-{id(tmp_path)}", cache_dir=tmp_path / "cache")
    store.publish(tiny_export)
    store.promote(DOMAIN, 1, "production")
    for bad in ["*", "../tiny", "tiny/..", "/etc", "t?ny", "[t]iny", "s3://x/tiny", "%2e%2e", "Tiny", ""]:
        calls = [
            (store.versions, (bad,)),
            (store.aliases, (bad,)),
            (store.resolve, (bad, "latest")),
            (store.remove, (bad, 1)),
            (store.promote, (bad, 1, "production")),
            (store.show, (bad, 1)),
            (store.resolve, (DOMAIN, bad)),
            (store.promote, (DOMAIN, 1, bad)),
        ]
        for call, args in calls:
            with pytest.raises(ConfigError, match="not a valid name"):
                call(*args)
    assert store.versions(DOMAIN) == [1] and store.aliases(DOMAIN) == {"production": 1}


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_remove_with_a_glob_deletes_nothing(
    kind: str, tmp_path: Path, tiny_export: Path, request: pytest.FixtureRequest
) -> None:
    s3 = request.getfixturevalue("s3_endpoint") if kind == "s3" else None
    url, options = store_url(kind, tmp_path, s3)
    store = ModelRegistry(url, storage_options=options, cache_dir=tmp_path / "cache")
    other = edited_export(tiny_export, tmp_path / "other_export", domain="other")
    store.publish(tiny_export)
    store.publish(other)
    for pattern in ("*", "t*", "?iny", "[ot]*"):
        with pytest.raises(ConfigError, match="not a valid name"):
            store.remove(pattern, 1)
    assert store.versions("tiny") == [1] and store.versions("other") == [1]


def test_registry_show_with_a_path_is_a_one_line_error(tmp_path: Path, tiny_export: Path) -> None:
    registry = tmp_path / "registry"
    ModelRegistry(registry, cache_dir=tmp_path / "cache").publish(tiny_export, aliases=["production"])
    elsewhere = tmp_path / "x" / DOMAIN / "aliases"
    elsewhere.mkdir(parents=True)
    (elsewhere / "production.json").write_text('{"version": 1}')
    result = thali_in_process("registry", "--registry", str(registry), "show", f"../x/{DOMAIN}", "production")
    assert result.returncode == 2 and "not a valid name" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def _crafted_export(tiny_export: Path, tmp_path: Path) -> Path:
    export = tmp_path / "crafted"
    shutil.copytree(tiny_export, export)
    return export


def _edit_report(export: Path, change: Any) -> None:
    report = json.loads((export / "export.json").read_text())
    change(report)
    (export / "export.json").write_text(json.dumps(report))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["variants"]["int8"].update(file="../../../outside.onnx"), r"variants\.int8\.file"),
        (lambda r: r.update(domain="../escaped"), "domain"),
        (lambda r: r["variants"].update({"../x": r["variants"]["int8"]}), "not a valid variant name"),
        (lambda r: r["variants"]["int8"].pop("sha256"), r"variants\.int8\.sha256"),
        (lambda r: r["files"].pop("labels.json"), r"files\.labels\.json"),
        (lambda r: r.pop("files"), "records no sha256 of its metadata"),
        (lambda r: r.update(variants=[1]), "variants"),
    ],
)
def test_publish_trusts_no_name_in_export_json(
    change: Any, message: str, tmp_path: Path, tiny_export: Path
) -> None:
    export = _crafted_export(tiny_export, tmp_path)
    (tmp_path / "outside.onnx").write_bytes(b"a local file that was never part of the export")
    _edit_report(export, change)
    registry = tmp_path / "registry"
    store = ModelRegistry(registry, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelRegistryError, match=message):
        store.publish(export)
    assert not registry.exists(), "nothing written, no version number taken"
    assert not (tmp_path / "escaped").exists()


def test_publish_checks_metadata_files_and_refuses_links_out_of_the_export(
    tmp_path: Path, tiny_export: Path
) -> None:
    export = _crafted_export(tiny_export, tmp_path)
    labels = json.loads((export / "labels.json").read_text())
    labels["classes"][0]["display_name"] = "Swapped after export"
    (export / "labels.json").write_text(json.dumps(labels))
    store = ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "cache")
    with pytest.raises(ModelRegistryError, match=r"labels\.json is not the file `thali export` wrote"):
        store.publish(export)

    export = tmp_path / "linked"
    shutil.copytree(tiny_export, export)
    secret = tmp_path / "secret.onnx"
    shutil.copy(export / "model.int8.onnx", secret)  # same bytes, so only the link itself is wrong
    (export / "model.int8.onnx").unlink()
    (export / "model.int8.onnx").symlink_to(secret)
    with pytest.raises(ModelRegistryError, match="points outside the folder"):
        store.publish(export)
    assert store.versions(DOMAIN) == []


def test_malformed_export_json_is_a_one_line_error(tmp_path: Path, tiny_export: Path) -> None:
    export = _crafted_export(tiny_export, tmp_path)
    (export / "export.json").write_text('{"domain": "tiny", "variants": ')
    for args in (["publish", str(export), "--registry", str(tmp_path / "r")], ["bench", str(export)]):
        result = thali_in_process(*args)
        assert result.returncode != 0 and "export.json: not valid JSON" in result.stderr, args
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    (export / "export.json").write_text(json.dumps({"domain": "tiny"}))
    result = thali_in_process("bench", str(export))
    assert result.returncode != 0 and "variants" in result.stderr and "Traceback" not in result.stderr


def test_resolve_hands_out_private_verified_copies(tmp_path: Path, tiny_export: Path) -> None:
    registry = tmp_path / "registry"
    store = ModelRegistry(registry, cache_dir=tmp_path / "cache")
    store.publish(tiny_export)
    package = store.resolve(DOMAIN, 1)
    model = package.model_path("fp32")
    assert not model.resolve().is_relative_to(registry.resolve()), "not a path inside the shared store"
    assert oct(package.folder.stat().st_mode & 0o777) == "0o700"
    verified = model.read_bytes()
    stored = registry / DOMAIN / "versions" / "1" / "model.onnx"
    stored.write_bytes(b"swapped after the check")  # a writer of the store, after resolve()
    assert model.read_bytes() == verified  # what was handed out is still what was verified
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        store.resolve(DOMAIN, 1)


def test_the_cache_is_keyed_by_url_and_storage_options(
    tmp_path: Path, tiny_export: Path, s3_endpoint: dict[str, Any]
) -> None:
    a = ModelRegistry("memory://same", storage_options={}, cache_dir=tmp_path)
    b = ModelRegistry("memory://same", storage_options={"skip_instance_cache": True}, cache_dir=tmp_path)
    assert a.cache != b.cache
    assert a.cache == ModelRegistry("memory://same", cache_dir=tmp_path).cache
    # one bucket URL on two S3 endpoints: a real one, and one that is somewhere else entirely
    url = f"s3://models/cache-{os.getpid()}"
    real = ModelRegistry(
        url, storage_options={"endpoint_url": s3_endpoint["endpoint_url"]}, cache_dir=tmp_path
    )
    other = ModelRegistry(url, storage_options={"endpoint_url": "http://127.0.0.1:9"}, cache_dir=tmp_path)
    assert real.cache != other.cache
    real.publish(tiny_export)
    package = real.resolve(DOMAIN, 1)
    assert package.folder.is_relative_to(real.cache) and not other.cache.exists()


def test_malformed_alias_and_missing_card_are_one_line_errors(tmp_path: Path, tiny_export: Path) -> None:
    registry = tmp_path / "registry"
    store = ModelRegistry(registry, cache_dir=tmp_path / "cache")
    store.publish(tiny_export, aliases=["production"])
    (registry / DOMAIN / "aliases" / "staging.json").write_text("[1]")
    assert store.aliases(DOMAIN) == {"production": 1}  # the broken record does not hide the good ones
    with pytest.raises(IntegrityError, match=r"staging\.json: alias record is malformed"):
        store.resolve(DOMAIN, "staging")
    listing = thali_in_process("registry", "--registry", str(registry), "list")
    assert listing.returncode == 0 and "v1 (production)" in listing.stdout
    shown = thali_in_process("registry", "--registry", str(registry), "show", DOMAIN, "staging")
    assert shown.returncode == 5 and "alias record is malformed" in shown.stderr
    (registry / DOMAIN / "versions" / "1" / "card.json").unlink()
    shown = thali_in_process("registry", "--registry", str(registry), "show", DOMAIN, "1")
    assert shown.returncode == 5 and "card.json is missing" in shown.stderr
    assert "Traceback" not in shown.stderr  # the broken alias is a warning line, the error one line
    assert shown.stderr.strip().splitlines()[-1].startswith("error: tiny v1: card.json is missing")


def _aliases_point_at_versions(store: ModelRegistry) -> None:
    versions = store.versions(DOMAIN)
    for alias, version in store.aliases(DOMAIN).items():
        assert version in versions, f"alias {alias} points at removed v{version}"


@pytest.mark.parametrize("moment", ["before hiding", "after hiding"])
def test_a_promote_racing_a_remove_never_leaves_a_dangling_alias(
    moment: str, tmp_path: Path, tiny_export: Path
) -> None:
    """The concurrent promote is a second registry client on the same store, run at the exact moment
    between remove's alias check and its delete (by wrapping the store's filesystem call)."""
    url = str(tmp_path / "registry")
    store = ModelRegistry(url, cache_dir=tmp_path / "c1")
    other = ModelRegistry(url, cache_dir=tmp_path / "c2")
    store.publish(tiny_export)
    store.publish(tiny_export, aliases=["production"])
    real_rm, outcome = store.fs.rm, {}

    def rm(path: str, *args: Any, **kwargs: Any) -> Any:
        racing = path.endswith("versions/1/checksums.json") and "promote" not in outcome
        if racing and moment == "before hiding":
            outcome["promote"] = other.promote(DOMAIN, 1, "staging")
        result = real_rm(path, *args, **kwargs)
        if racing and moment == "after hiding":
            try:
                outcome["promote"] = other.promote(DOMAIN, 1, "staging")
            except NotFoundError as exc:
                outcome["promote"] = exc
        return result

    store.fs.rm = rm  # type: ignore[method-assign]
    try:
        store.remove(DOMAIN, 1)
        outcome["remove"] = "removed"
    except ModelRegistryError as exc:
        outcome["remove"] = exc
    finally:
        del store.fs.rm
    _aliases_point_at_versions(store)
    if moment == "before hiding":  # the promote won: the version stays, the remove is refused
        assert isinstance(outcome["remove"], ModelRegistryError) and "staging" in str(outcome["remove"])
        assert store.versions(DOMAIN) == [1, 2] and store.aliases(DOMAIN)["staging"] == 1
        store.resolve(DOMAIN, "staging")  # complete and verified
    else:  # the remove won: the promote is refused and the alias put back as it was
        assert outcome["remove"] == "removed" and isinstance(outcome["promote"], NotFoundError)
        assert store.versions(DOMAIN) == [2] and "staging" not in store.aliases(DOMAIN)


def test_concurrent_promotes_and_removes_keep_every_alias_valid(tmp_path: Path, tiny_export: Path) -> None:
    url = str(tmp_path / "registry")
    ModelRegistry(url, cache_dir=tmp_path / "c").publish(tiny_export, aliases=["production"])
    failures: list[BaseException] = []

    def act(call: Any, *args: Any) -> None:
        try:
            call(*args)
        except ModelRegistryError:  # refused: fine
            pass
        except BaseException as exc:  # anything else fails the test
            failures.append(exc)

    for _ in range(6):
        version = ModelRegistry(url, cache_dir=tmp_path / "c").publish(tiny_export)["version"]
        a, b = ModelRegistry(url, cache_dir=tmp_path / "a"), ModelRegistry(url, cache_dir=tmp_path / "b")
        threads = [
            threading.Thread(target=act, args=(a.remove, DOMAIN, version)),
            threading.Thread(target=act, args=(b.promote, DOMAIN, version, "staging")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not failures
        _aliases_point_at_versions(ModelRegistry(url, cache_dir=tmp_path / "c"))


def test_a_killed_publish_is_swept_by_the_next(tmp_path: Path, tiny_export: Path) -> None:
    url = str(tmp_path / "registry")
    store = ModelRegistry(url, cache_dir=tmp_path / "cache")
    store.publish(tiny_export)
    # a real publish process, killed after claiming a number and writing one file of the package
    script = (
        "import os, signal, sys\n"
        "from thali.registry import ModelRegistry\n"
        "store = ModelRegistry(sys.argv[1])\n"
        "real = store._write_whole\n"
        "def write(path, data):\n"
        "    real(path, data)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "store._write_whole = write\n"
        "store.publish(sys.argv[2])\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, url, str(tiny_export)], timeout=120)
    assert killed.returncode == -9
    half = Path(url) / DOMAIN / "versions" / "2"
    assert half.is_dir() and not (half / "checksums.json").exists()
    assert store.versions(DOMAIN) == [1]  # invisible to readers
    assert store.publish(tiny_export)["version"] == 3
    assert not half.exists(), "the dead publish's files are gone"


def test_signed_packages_under_a_trust_policy(tmp_path: Path, tiny_export: Path) -> None:
    registry, key, foreign = tmp_path / "registry", tmp_path / "publisher.key", tmp_path / "foreign.key"
    for k in (key, foreign):
        made = thali_in_process("registry", "keygen", str(k))
        assert made.returncode == 0 and "key id" in made.stdout, made.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    published = thali_in_process(
        "publish", str(tiny_export), "--registry", str(registry), "--sign-key", str(key)
    )
    assert published.returncode == 0 and "published signed tiny v1" in published.stdout, published.stderr
    trusted = ["--trusted-key", f"{key}.pub"]
    ok = thali_in_process("registry", "--registry", str(registry), "verify", DOMAIN, "1", *trusted)
    assert ok.returncode == 0 and "signed by trusted key" in ok.stdout, ok.stderr
    store = ModelRegistry(registry, cache_dir=tmp_path / "cache", trusted_keys=[f"{key}.pub"])
    assert store.resolve(DOMAIN, 1).signed_by

    # a writer of the bucket swaps the model, rewrites checksums.json and signs with its own key
    from thali.registry.signing import sign

    evil = b"not the publisher's model"
    (registry / DOMAIN / "versions" / "1" / "model.onnx").write_bytes(evil)
    raw = _rewrite_checksums(store, 1, lambda files: files.update({"model.onnx": sha256_bytes(evil)}))
    (registry / DOMAIN / "versions" / "1" / "signature.json").write_bytes(sign(raw, foreign))
    refused = thali_in_process("registry", "--registry", str(registry), "verify", DOMAIN, "1", *trusted)
    assert refused.returncode == 5 and "which is not trusted" in refused.stderr
    assert "Traceback" not in refused.stderr
    with pytest.raises(IntegrityError, match="not trusted"):
        store.resolve(DOMAIN, 1)
    # ... or keeps the publisher's signature: it no longer matches the checksums
    (registry / DOMAIN / "versions" / "1" / "signature.json").write_bytes(sign(b"the old checksums", key))
    with pytest.raises(IntegrityError, match=r"does not match checksums\.json"):
        store.resolve(DOMAIN, 1)

    # unsigned: refused under the policy, loaded without one
    plain = ModelRegistry(tmp_path / "plain", cache_dir=tmp_path / "cache2")
    plain.publish(tiny_export)
    with pytest.raises(IntegrityError, match="is not signed"):
        ModelRegistry(tmp_path / "plain", cache_dir=tmp_path / "c3", trusted_keys=[f"{key}.pub"]).resolve(
            DOMAIN, 1
        )
    assert plain.resolve(DOMAIN, 1).signed_by is None
    env_policy = thali_in_process(
        "registry", "--registry", str(tmp_path / "plain"), "verify", DOMAIN,
        env={"THALI_TRUSTED_KEYS": f"{key}.pub"},
    )  # fmt: skip
    assert env_policy.returncode == 5 and "is not signed" in env_policy.stderr
