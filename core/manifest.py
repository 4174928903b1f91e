"""The model manifest: one typed description of what a model package is, from export to UI.

``thali export`` writes it as ``card.json`` into the export folder (the export folder *is* the package,
without a number yet); ``thali publish`` only numbers it (``version``, ``published_at``), checksums and
signs it. The registry, the server, ``thali evaluate``, ``thali bench``, the API's ``/card`` answer (its
OpenAPI schema is generated from :class:`Manifest`) and the UI read this one model.

Format history (``format``):

* 1 (thali 0.1, before the manifest): ``card.json`` held the run's ``config.yaml`` verbatim, the
  variants' metrics under ``metrics``, and machine paths (``lineage.run``, ``lineage.export_dir``,
  ``dataset.root``). :func:`read_manifest` upgrades it on load: serving defaults come from its config,
  the run becomes its folder name, paths are dropped.
* 2: this module. Lineage is ids and hashes only; ``serving`` holds the defaults *after* the export's
  ``--set`` overrides; per-variant metrics and gate verdicts sit under ``variants``.

A manifest is data from an untrusted store: :func:`read_manifest` turns every shape error into one
:class:`~thali.core.errors.IntegrityError` line naming the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import IntegrityError, ModelRegistryError
from .export import EXPORT_MANIFEST, variant_file
from .images import DEFAULT_CROP_PCT, DEFAULT_LIMITS
from .names import is_valid_name

FORMAT: Literal[2] = 2
#: File names inside a package (and an export folder).
CARD = EXPORT_MANIFEST
LABELS = "labels.json"
PREPROCESS = "preprocess.json"
CALIBRATION = "calibration.json"

__all__ = [
    "CARD",
    "FORMAT",
    "ClassLabel",
    "DatasetInfo",
    "ImageCaps",
    "Lineage",
    "Manifest",
    "ModelPackage",
    "Preprocess",
    "Serving",
    "VariantCard",
    "manifest_openapi_schemas",
    "read_manifest",
]


class _Model(BaseModel):
    # unknown keys from a newer thali are ignored on read, never trusted
    model_config = ConfigDict(extra="ignore", frozen=True)


class ClassLabel(_Model):
    name: str = Field(description="the class's name (a folder name of the dataset)")
    display_name: str = Field("", description="what the UI shows")
    description: str = ""


class Preprocess(_Model):
    """How a server prepares a photo exactly as evaluation did (also ``preprocess.json``)."""

    input_size: list[int] = Field(description="[3, H, W]", min_length=3, max_length=3)
    resize_shorter_side: int = Field(gt=0)
    crop_pct: float = Field(DEFAULT_CROP_PCT, gt=0, le=1)
    center_crop: list[int] = Field(min_length=2, max_length=2)
    interpolation: str = "bilinear"
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    pixel_scale: float = 255.0
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    input_name: str = "input"
    output_name: str = "logits"
    explain_output: str | None = Field(None, description="the class-activation output ('cam'), if any")


class Serving(_Model):
    """Serving defaults, as the export's config had them after its ``--set`` overrides."""

    backend: str = "onnxruntime"
    variant: str = "fp32"
    top_k: int = Field(5, ge=1)
    max_batch_size: int = Field(32, ge=1)
    batch_timeout_ms: float = Field(5.0, ge=0)


class ClassScore(_Model):
    precision: float | None = None
    recall: float | None = None
    support: int = 0


class GateVerdict(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    passed: bool
    reasons: list[str] = Field(default_factory=list)
    top1_drop: float | None = None


class VariantCard(_Model):
    """One variant that passed its gate: its file and its scores on the validation split."""

    file: str = Field(description="model.onnx for fp32, model.<variant>.onnx otherwise")
    size_bytes: int | None = None
    top1: float | None = None
    top5: float | None = None
    ece: float | None = None
    nll: float | None = None
    per_class: dict[str, ClassScore] = Field(default_factory=dict)
    confusion_matrix: list[list[int]] | None = None
    gate: GateVerdict | None = Field(None, description="the verdict against fp32 (none for fp32)")


class ImageCaps(_Model):
    """The image caps the model was trained with (``dataset.max_image_*``): what scoring it applies."""

    max_pixels: int = Field(DEFAULT_LIMITS.max_pixels, gt=0)
    max_bytes: int = Field(DEFAULT_LIMITS.max_bytes, gt=0)


class DatasetInfo(_Model):
    fingerprint: str | None = Field(None, description="sha256 over the training split's files")
    validation_images: int | None = None
    validation_skipped: int | None = None


class Lineage(_Model):
    """Where the package came from, as ids and hashes (never a machine's folders)."""

    run_id: str | None = Field(None, description="the training run's folder name")
    checkpoint: str = "best.pt"
    checkpoint_sha256: str | None = None
    data_fingerprint: str | None = None
    exported_at: str | None = None
    exported_with: str | None = Field(None, description="the thali version that exported it")


class Manifest(_Model):
    """What a model package is (``card.json``)."""

    format: Literal[2] = FORMAT
    domain: str
    version: int | None = Field(None, description="the registry's number; none before publishing")
    published_at: str | None = None
    thali_version: str | None = Field(None, description="the thali version that published it")
    description: str = ""
    licence: str = Field("not stated", description="the training data's licence or terms")
    classes: list[ClassLabel] = Field(default_factory=list)
    preprocess: Preprocess | None = None
    serving: Serving = Field(default_factory=Serving)
    variants: dict[str, VariantCard] = Field(description="variant name -> its file and scores")
    rejected_variants: dict[str, list[str]] = Field(
        default_factory=dict, description="variant name -> why it was not published"
    )
    parity: dict[str, float] | None = Field(None, description="ONNX against torch on validation photos")
    unknown: dict[str, Any] | None = Field(None, description="the unknown flag's score and its rates")
    dataset: DatasetInfo = Field(default_factory=DatasetInfo)
    image_caps: ImageCaps = Field(default_factory=ImageCaps)
    lineage: Lineage = Field(default_factory=Lineage)

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError("not a valid domain name")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, VariantCard]) -> dict[str, VariantCard]:
        if "fp32" not in value:
            raise ValueError("has no fp32 variant")
        for name, entry in value.items():
            if not is_valid_name(name):
                raise ValueError(f"{name!r} is not a valid variant name")
            if entry.file != variant_file(name):
                raise ValueError(f"{name}.file must be {variant_file(name)!r}, not {entry.file!r}")
        return value

    def numbered(self, version: int, published_at: str, thali_version: str) -> Manifest:
        """This manifest as published under ``version`` (what ``thali publish`` changes, nothing else)."""
        return self.model_copy(
            update={"version": version, "published_at": published_at, "thali_version": thali_version}
        )

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode()


def read_manifest(data: Any, where: str) -> Manifest:
    """``card.json``'s content (either format) as a :class:`Manifest`; one line naming the field if it
    is not one. ``where`` names the package in the message (``"plant_disease v2"``)."""
    if not isinstance(data, dict):
        raise IntegrityError(f"{where}: card.json is not a JSON object")
    found = data.get("format", 1)
    if found == 1 or "format" not in data:
        data = upgrade_v1(data)
    elif found != FORMAT:
        raise IntegrityError(
            f"{where}: card.json has format {found!r}; this thali reads formats 1 and {FORMAT} "
            "(upgrade thali)"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field_path = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise IntegrityError(f"{where}: card.json: {field_path}: {first['msg']}") from None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def upgrade_v1(card: dict[str, Any]) -> dict[str, Any]:
    """A format-1 card (thali 0.1) as format-2 data: metrics become ``variants``, serving defaults and
    the description come from the embedded config, machine paths are dropped."""
    config, lineage, dataset = (
        _mapping(card.get("config")),
        _mapping(card.get("lineage")),
        _mapping(card.get("dataset")),
    )
    run = lineage.get("run")
    run_id = _last_part(run) if isinstance(run, str) and run else None
    classes = [
        {k: c.get(k) or "" for k in ("name", "display_name", "description")}
        for c in config.get("classes") or []
        if isinstance(c, dict) and isinstance(c.get("name"), str)
    ]
    return {
        "format": FORMAT,
        "domain": card.get("domain"),
        "version": card.get("version"),
        "published_at": card.get("created_at"),
        "thali_version": card.get("thali_version"),
        "description": str(config.get("description") or ""),
        "licence": str(
            dataset.get("licence") or _mapping(config.get("dataset")).get("licence") or "not stated"
        ),
        "classes": classes,
        "serving": _mapping(config.get("serving")),
        "variants": _mapping(card.get("metrics")),
        "rejected_variants": _mapping(card.get("rejected_variants")),
        "parity": card.get("parity"),
        "unknown": card.get("unknown"),
        "dataset": {k: dataset.get(k) for k in ("fingerprint", "validation_images", "validation_skipped")},
        "image_caps": {
            k: v
            for k, v in (
                ("max_pixels", _mapping(config.get("dataset")).get("max_image_pixels")),
                ("max_bytes", _mapping(config.get("dataset")).get("max_image_bytes")),
            )
            if isinstance(v, int) and v > 0
        },
        "lineage": {
            "run_id": run_id,
            "checkpoint": lineage.get("checkpoint") or "best.pt",
            "checkpoint_sha256": lineage.get("checkpoint_sha256"),
            "data_fingerprint": dataset.get("fingerprint"),
            "exported_at": lineage.get("exported_at"),
            "exported_with": lineage.get("exported_with"),
        },
    }


def _last_part(path: str) -> str:
    """The folder name of a path written on any machine (POSIX or Windows)."""
    return PureWindowsPath(path).name if "\\" in path else PurePosixPath(path).name


RUNS_ENV = "THALI_RUNS"


def default_run_folder(domain: str, run_id: str | None) -> Path | None:
    """Where ``thali train`` puts the run a manifest names: ``$THALI_RUNS/DOMAIN/RUN_ID``, else
    ``runs/DOMAIN/RUN_ID``; None when the id (or domain) is not one plain folder name, so data from a
    package never names a path outside that folder."""
    plain = bool(run_id) and "/" not in str(run_id) and "\\" not in str(run_id) and run_id not in (".", "..")
    if not plain or not is_valid_name(domain):
        return None
    return Path(os.environ.get(RUNS_ENV) or "runs") / domain / str(run_id)


def manifest_openapi_schemas() -> dict[str, dict[str, Any]]:
    """:class:`Manifest` and the models it uses as OpenAPI 3.0 component schemas (by name)."""
    schema = Manifest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {name: _openapi30(body) for name, body in {**defs, "Manifest": schema}.items()}


def _openapi30(node: Any) -> Any:
    """JSON Schema 2020-12 (pydantic) as OpenAPI 3.0: ``null`` in ``anyOf`` -> ``nullable``, ``const``
    -> a one-value ``enum``, a numeric ``exclusiveMinimum`` -> ``minimum`` + ``exclusiveMinimum: true``."""
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi30(v) for k, v in node.items()}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), int | float) and not isinstance(out[bound], bool):
            out[plain], out[bound] = out[bound], True
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        out.pop("anyOf")
        if len(rest) == 1 and "$ref" not in rest[0]:
            out.update(rest[0])
        else:
            out["anyOf" if len(rest) > 1 else "allOf"] = rest
        out["nullable"] = True
    return out


@dataclass
class ModelPackage:
    """A loaded, verified model package: what the registry hands out and a serving backend gets.

    ``files`` are local paths whose sha256 matched; ``manifest`` is the typed ``card.json``;
    ``labels``, ``preprocess`` and ``calibration`` are the other metadata files as read."""

    domain: str
    version: int
    folder: Path
    files: dict[str, Path]
    labels: dict[str, Any]
    preprocess: dict[str, Any]
    calibration: dict[str, Any]
    manifest: Manifest
    aliases: list[str] = field(default_factory=list)
    signed_by: str | None = None

    @property
    def card(self) -> dict[str, Any]:
        """The manifest as JSON data (what the API's ``/card`` answers)."""
        return self.manifest.model_dump(mode="json")

    @property
    def variants(self) -> dict[str, Path]:
        """Variant name -> verified ONNX file (``fp32``, ``int8``, ``fp16``, …). File names come from
        the variant names, and only files that passed their checksum count."""
        names = list(self.manifest.variants)
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
