"""The model package: what the registry stores and the server loads.

``model.onnx`` (+ ``model.int8.onnx``, ``model.fp16.onnx``, … that passed the gate), ``labels.json``,
``preprocess.json``, ``calibration.json``, ``card.json`` and ``checksums.json`` (sha256 of every other
file). It is built from an export folder (``thali export``) and checked file by file when loaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thali.core.errors import DataError, ModelRegistryError
from thali.core.export import EXPORT_CONFIG, METADATA_FILES, is_model_file, read_export_report, variant_file
from thali.core.files import inside, read_bounded
from thali.core.names import is_valid_name

CHECKSUMS = "checksums.json"
CARD = "card.json"
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


def _card(export_dir: Path, export: dict[str, Any], config_text: bytes, version: int) -> dict[str, Any]:
    from thali.core import __version__

    config = _config_mapping(export_dir, config_text)
    metrics = {}
    for name, entry in export["variants"].items():
        m = entry["metrics"]
        metrics[name] = {
            "file": variant_file(name),
            "size_bytes": entry.get("size_bytes"),
            **{key: m.get(key) for key in ("top1", "top5", "ece", "nll", "per_class", "confusion_matrix")},
            "gate": entry.get("gate"),
        }
    dataset = dict(export.get("dataset", {}))
    dataset["licence"] = ((config.get("dataset") or {}).get("licence")) or "not stated"
    return {
        "domain": export["domain"],
        "version": version,
        "created_at": utc_now(),
        "thali_version": __version__,
        "variants": sorted(metrics),
        "metrics": metrics,
        "rejected_variants": {
            k: v.get("reasons", []) if isinstance(v, dict) else []
            for k, v in export.get("rejected", {}).items()
        },
        "parity": export.get("parity"),
        "unknown": export.get("unknown"),
        "dataset": dataset,
        "config": config,
        "lineage": {
            **export.get("lineage", {}),
            "export_dir": str(export_dir.resolve()),
            "exported_at": export.get("created_at"),
            "exported_with": export.get("thali_version"),
        },
    }


def read_export(export_dir: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The export's report and its model and metadata files, each checked against the sha256 that
    ``thali export`` recorded in ``export.json``, and each read from inside the export folder only."""
    export_dir = Path(export_dir)
    try:
        export = read_export_report(export_dir)
    except DataError as exc:
        raise ModelRegistryError(exc.message, errors=exc.errors) from None
    recorded = {variant_file(name): entry["sha256"] for name, entry in export["variants"].items()}
    recorded.update({name: export["files"][name] for name in (*METADATA, EXPORT_CONFIG)})
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


def _config_mapping(export_dir: Path, text: bytes) -> dict[str, Any]:
    from thali.core.errors import ConfigError
    from thali.core.safe_yaml import parse_yaml

    try:
        data = parse_yaml(text.decode("utf-8"), str(export_dir / EXPORT_CONFIG))[0] if text else {}
    except UnicodeDecodeError:
        raise ModelRegistryError(f"{export_dir / EXPORT_CONFIG}: not UTF-8 text") from None
    except ConfigError as exc:
        raise ModelRegistryError(exc.message) from None
    return data if isinstance(data, dict) else {}


def package_files(
    export_dir: Path, export: dict[str, Any], files: dict[str, bytes], version: int
) -> dict[str, bytes]:
    """Every file of the package for ``version``: the export's files, card.json, checksums.json last."""
    files = dict(files)
    config_text = files.pop(EXPORT_CONFIG, b"")
    files[CARD] = json.dumps(
        _card(Path(export_dir), export, config_text, version), indent=1, default=str
    ).encode()
    checksums = {name: sha256_bytes(data) for name, data in files.items()}
    files[CHECKSUMS] = json.dumps({"algorithm": "sha256", "files": checksums}, indent=1).encode()
    return files


@dataclass
class ModelPackage:
    """A loaded, verified model package. ``files`` are local paths whose sha256 matched."""

    domain: str
    version: int
    folder: Path
    files: dict[str, Path]
    labels: dict[str, Any]
    preprocess: dict[str, Any]
    calibration: dict[str, Any]
    card: dict[str, Any]
    aliases: list[str] = field(default_factory=list)

    signed_by: str | None = None

    @property
    def variants(self) -> dict[str, Path]:
        """Variant name -> verified ONNX file (``fp32``, ``int8``, ``fp16``, …). File names come from
        the variant names (never from the card), and only files that passed their checksum count."""
        names = [n for n in self.card.get("metrics", {}) if is_valid_name(n)]
        return {n: self.files[variant_file(n)] for n in names if variant_file(n) in self.files}

    def model_path(self, variant: str = "fp32") -> Path:
        if variant not in self.variants:
            have = ", ".join(sorted(self.variants))
            raise ModelRegistryError(
                f"{self.domain} v{self.version} has no {variant!r} variant; it has {have}"
            )
        return self.variants[variant]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.labels["classes"]]
