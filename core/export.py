"""The exporter contract: what exporter plugins share while turning a trained model into variants.

Exporters are registered by name (``thali_register_exporters``) and run in order: ``onnx`` writes the
raw export, ``ort_optimize`` the graph-optimised fp32 model, then one exporter per variant named in
``export.variants`` (``int8``, ``fp16``, ``int8_dynamic`` or a plugin's own). Each exporter reads what
earlier ones left in ``artifacts``, writes its file into ``out_dir`` and returns a report (parity, node
counts, sizes, settings). A *variant* exporter sets ``produces`` to the variant name and stores its
file as ``artifacts[produces]``; the export engine then gates it on the validation split and only
copies it into the export folder when it passes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import ExportConfig
from .errors import DataError, ThaliError
from .names import check_name, is_valid_name

#: File name of each built-in variant inside an export (and a model package).
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
    "int8_dynamic": "model.int8_dynamic.onnx",
}


#: The metadata files of an export (and of a model package) besides the models; each one's sha256 is
#: recorded in ``export.json`` under ``files``.
METADATA_FILES: tuple[str, ...] = ("labels.json", "preprocess.json", "calibration.json")
EXPORT_REPORT = "export.json"
#: The names of a thali ONNX model's input and outputs: the ``onnx`` exporter writes them, the serving
#: backends and the unknown score read them. ``features`` (N, C) are the pooled penultimate features,
#: ``stage_features`` (N, S) earlier stages' pooled outputs, ``cam`` (N, K, h, w) class-activation maps.
INPUT, LOGITS, FEATURES, STAGE_FEATURES, CAM = "input", "logits", "features", "stage_features", "cam"
OUTPUTS: tuple[str, ...] = (LOGITS, FEATURES, STAGE_FEATURES, CAM)
EXPORT_CONFIG = "config.yaml"
#: The package's manifest (:class:`thali.core.manifest.Manifest`), written by ``thali export``.
EXPORT_MANIFEST = "card.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def variant_file(variant: str) -> str:
    """``model.onnx`` for fp32, ``model.<variant>.onnx`` for every other variant (plugins' too).

    The variant name must follow the one name rule (:mod:`thali.core.names`), so the file name is always
    one plain name inside the export or package folder; it is never read from metadata."""
    check_name(variant, "variant")
    return VARIANT_FILES.get(variant, f"model.{variant}.onnx")


def is_model_file(name: str) -> bool:
    """Whether ``name`` is the file name of some variant (``model.onnx``, ``model.<variant>.onnx``)."""
    if name == "model.onnx":
        return True
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "model" and parts[2] == "onnx" and is_valid_name(parts[1])


def read_export_report(export_dir: Path) -> dict[str, Any]:
    """``export.json`` of an export folder, checked for the shape thali relies on.

    An export folder is untrusted input (a teammate's, a download): the domain and every variant name
    must follow the name rule, every variant's ``file`` must be the name :func:`variant_file` gives it,
    and every model and metadata file must have a recorded sha256. Anything else is a one-line
    :class:`DataError` naming the file and the field."""
    from .files import read_bounded

    export_dir = Path(export_dir)
    path = export_dir / EXPORT_REPORT
    if not path.is_file():
        raise DataError(f"{export_dir}: not an export (no {EXPORT_REPORT}); run `thali export RUN_DIR` first")

    def bad(field_path: str, why: str) -> DataError:
        return DataError(f"{path}: {field_path}: {why}", errors={field_path: why})

    try:
        report = json.loads(read_bounded(path, 64 * 1024 * 1024, EXPORT_REPORT))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(report, dict):
        raise bad("(top level)", "expected a JSON object")
    if not is_valid_name(report.get("domain")):
        raise bad("domain", f"{report.get('domain')!r} is not a valid domain name")
    _check_variants(report.get("variants"), bad)
    _check_files(report.get("files"), bad)
    for key in ("lineage", "dataset", "rejected"):
        if not isinstance(report.get(key, {}), dict):
            raise bad(key, "expected an object")
    return report


def _check_variants(variants: Any, bad: Callable[[str, str], DataError]) -> None:
    if not isinstance(variants, dict) or "fp32" not in variants:
        raise bad("variants", "expected an object with at least the fp32 variant")
    for name, entry in variants.items():
        where = f"variants.{name}"
        if not is_valid_name(name):
            raise bad(where, "not a valid variant name")
        if not isinstance(entry, dict):
            raise bad(where, "expected an object")
        if entry.get("file") != variant_file(name):
            raise bad(f"{where}.file", f"expected {variant_file(name)!r}, found {entry.get('file')!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"{where}.sha256", "missing or not a sha256; export again")
        if not isinstance(entry.get("metrics"), dict):
            raise bad(f"{where}.metrics", "missing")


def _check_files(files: Any, bad: Callable[[str, str], DataError]) -> None:
    if not isinstance(files, dict):
        raise bad("files", "missing: this export records no sha256 of its metadata files; export again")
    for name in (*METADATA_FILES, EXPORT_CONFIG):
        if not isinstance(files.get(name), str) or not _SHA256.fullmatch(files[name]):
            raise bad(f"files.{name}", "missing or not a sha256; export again")
    if not isinstance(files.get(EXPORT_MANIFEST), str) or not _SHA256.fullmatch(files[EXPORT_MANIFEST]):
        raise bad(
            f"files.{EXPORT_MANIFEST}",
            "missing: an export of an older thali (no manifest); export the run again",
        )


@dataclass
class ExportContext:
    """Shared state of one export.

    ``model``: the trained classifier (torch, eval mode). ``example``: a float32 ``(N, 3, H, W)`` batch
    of real, preprocessed images used for tracing and for parity checks. ``settings``: the domain's
    ``export`` config section (calibration size and method, excluded nodes, gate; defaults if not
    given). ``calibration``: a callable returning an iterator of preprocessed float32 numpy batches of
    *training* images, for static quantisation. ``out_dir``: where exporters write (a working folder;
    the engine copies what passes into the export). ``artifacts`` maps ``fp32_raw``, ``fp32`` and
    variant names to files; ``warnings`` collects what the user must read (printed by the CLI).
    """

    model: Any
    example: Any
    out_dir: Path
    opset: int = 18
    settings: ExportConfig = field(default_factory=ExportConfig)
    calibration: Callable[[], Iterator[Any]] | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _torch_logits: Any = field(default=None, repr=False)

    def require(self, artifact: str, by: str) -> Path:
        """The file an earlier exporter stored as ``artifact``; a clear error if it has not run."""
        if artifact not in self.artifacts:
            step = "onnx" if artifact == "fp32_raw" else artifact
            raise ThaliError(f"{by} needs the {step} exporter to run first")
        return self.artifacts[artifact]

    def torch_logits(self) -> Any:
        """The torch model's logits on ``example`` (numpy), computed once per export for every parity
        check."""
        if self._torch_logits is None:
            import torch

            with torch.no_grad():
                self._torch_logits = self.model(self.example).numpy()
        return self._torch_logits


class Exporter(Protocol):
    """What ``registry.create(name)`` returns for an exporter: ``produces`` is the variant name it
    writes (``None`` for the steps that make the fp32 model) and ``run`` returns its report."""

    produces: str | None

    def run(self, context: ExportContext) -> dict[str, Any]: ...
