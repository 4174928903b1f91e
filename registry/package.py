"""The model package: what the registry stores and the server loads.

``model.onnx`` (+ ``model.int8.onnx``, ``model.fp16.onnx``, … that passed the gate), ``labels.json``,
``preprocess.json``, ``calibration.json``, ``card.json`` (the manifest, :mod:`thali.core.manifest`) and
``checksums.json`` (sha256 of every other file). It is an export folder (``thali export``) numbered and
checksummed, and it is checked file by file when loaded. :class:`ModelPackage` lives in
:mod:`thali.core.manifest` (serving backends receive it) and is re-exported here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from thali.core.errors import DataError, IntegrityError, ModelRegistryError
from thali.core.export import EXPORT_CONFIG, METADATA_FILES, is_model_file, read_export_report, variant_file
from thali.core.files import inside, read_bounded
from thali.core.manifest import CARD, ModelPackage, read_manifest

__all__ = ["CARD", "CHECKSUMS", "ModelPackage", "is_package_file", "package_files", "read_export"]

CHECKSUMS = "checksums.json"
SIGNATURE = "signature.json"
METADATA = METADATA_FILES
MAX_MODEL_BYTES = 4 * 1024**3  # ONNX's protobuf limit is 2 GB; anything larger is not a model of ours
MAX_METADATA_BYTES = 16 * 1024**2


def is_package_file(name: str) -> bool:
    """Whether ``name`` belongs to the fixed set of file names a package may hold (checksums.json and
    signature.json aside): a model file or one of the metadata files. Names in a store's
    ``checksums.json`` outside this set are refused, so metadata never chooses a path."""
    return isinstance(name, str) and (name in (*METADATA, CARD) or is_model_file(name))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_export(export_dir: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The export's report and its model and metadata files, each checked against the sha256 that
    ``thali export`` recorded in ``export.json``, and each read from inside the export folder only."""
    export_dir = Path(export_dir)
    try:
        export = read_export_report(export_dir)
    except DataError as exc:
        raise ModelRegistryError(exc.message, errors=exc.errors) from None
    recorded = {variant_file(name): entry["sha256"] for name, entry in export["variants"].items()}
    recorded.update({name: export["files"][name] for name in (*METADATA, CARD, EXPORT_CONFIG)})
    files: dict[str, bytes] = {}
    for name, expected in recorded.items():
        limit = MAX_MODEL_BYTES if name.endswith(".onnx") else MAX_METADATA_BYTES
        try:
            path = inside(export_dir, name)
            if not path.is_file():
                raise ModelRegistryError(f"{export_dir}: {name} is missing; export again")
            data = read_bounded(path, limit, name)
        except DataError as exc:
            raise ModelRegistryError(exc.message) from None
        if sha256_bytes(data) != expected:
            raise ModelRegistryError(
                f"{export_dir}: {name} is not the file `thali export` wrote (sha256 changed); export again"
            )
        files[name] = data
    return export, files


def package_files(
    export_dir: Path, export: dict[str, Any], files: dict[str, bytes], version: int
) -> dict[str, bytes]:
    """Every file of the package for ``version``: the export's files with its manifest numbered, and
    checksums.json last. Publishing changes nothing else: what ``thali export`` wrote is the package."""
    from thali.core import __version__

    files = {name: data for name, data in files.items() if name != EXPORT_CONFIG}
    try:
        manifest = read_manifest(json.loads(files[CARD]), str(Path(export_dir) / CARD))
    except ValueError as exc:
        raise ModelRegistryError(f"{Path(export_dir) / CARD}: not valid JSON ({exc})") from None
    except IntegrityError as exc:
        raise ModelRegistryError(exc.message) from None
    if manifest.domain != export["domain"]:
        raise ModelRegistryError(
            f"{export_dir}: card.json names domain {manifest.domain!r}, export.json {export['domain']!r}"
        )
    files[CARD] = manifest.numbered(version, utc_now(), __version__).to_json()
    checksums = {name: sha256_bytes(data) for name, data in files.items()}
    files[CHECKSUMS] = json.dumps({"algorithm": "sha256", "files": checksums}, indent=1).encode()
    return files
