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

from thali.core.errors import ModelRegistryError

CHECKSUMS = "checksums.json"
CARD = "card.json"
METADATA = ("labels.json", "preprocess.json", "calibration.json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _variant_files(export: dict[str, Any]) -> dict[str, str]:
    return {name: entry["file"] for name, entry in export["variants"].items()}


def _card(export_dir: Path, export: dict[str, Any], version: int) -> dict[str, Any]:
    import yaml

    from thali.core import __version__

    config = (
        yaml.safe_load((export_dir / "config.yaml").read_text())
        if (export_dir / "config.yaml").is_file()
        else {}
    )
    metrics = {}
    for name, entry in export["variants"].items():
        m = entry["metrics"]
        metrics[name] = {
            "file": entry["file"],
            "size_bytes": entry.get("size_bytes"),
            "top1": m["top1"],
            "top5": m["top5"],
            "ece": m["ece"],
            "nll": m["nll"],
            "per_class": m["per_class"],
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
        "rejected_variants": {k: v.get("reasons", []) for k, v in export.get("rejected", {}).items()},
        "parity": export.get("parity"),
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
    """The export's report and its model and metadata files, checked to be what `thali export` wrote."""
    export_dir = Path(export_dir)
    meta_path = export_dir / "export.json"
    if not meta_path.is_file():
        raise ModelRegistryError(
            f"{export_dir}: not an export (no export.json); run `thali export RUN_DIR` first"
        )
    export = json.loads(meta_path.read_text())
    files: dict[str, bytes] = {}
    recorded = {entry["file"]: entry.get("sha256") for entry in export["variants"].values()}
    for name in [*_variant_files(export).values(), *METADATA]:
        path = export_dir / name
        if not path.is_file():
            raise ModelRegistryError(f"{export_dir}: {name} is missing; export again")
        files[name] = path.read_bytes()
        if recorded.get(name) and sha256_bytes(files[name]) != recorded[name]:
            raise ModelRegistryError(
                f"{export_dir}: {name} is not the file `thali export` wrote (sha256 changed); export again"
            )
    return export, files


def package_files(
    export_dir: Path, export: dict[str, Any], files: dict[str, bytes], version: int
) -> dict[str, bytes]:
    """Every file of the package for ``version``: the export's files, card.json, checksums.json last."""
    files = dict(files)
    files[CARD] = json.dumps(_card(Path(export_dir), export, version), indent=1, default=str).encode()
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

    @property
    def variants(self) -> dict[str, Path]:
        """Variant name -> ONNX file (``fp32``, ``int8``, ``fp16``, …)."""
        return {name: self.files[m["file"]] for name, m in self.card["metrics"].items()}

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
