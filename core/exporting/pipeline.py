"""``thali export RUN_DIR``: a trained run becomes an export folder, the input of ``thali publish``.

Order: ``onnx`` (raw export, parity against torch on validation images) -> ``ort_optimize`` (the fp32
``model.onnx``) -> one exporter per variant in ``export.variants``. Every variant is scored on the whole
validation split in ONNX Runtime and gated against fp32 (see :mod:`.gate`); a variant that fails is not
written and ``export.json`` says why. The folder is assembled next to its destination and renamed into
place, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from thali.core.config import DomainConfig, check_components
from thali.core.errors import ConfigError, PluginError, ThaliError, one_line
from thali.core.export import (
    CAM,
    EXPORT_CONFIG,
    EXPORT_REPORT,
    INPUT,
    LOGITS,
    METADATA_FILES,
    STAGE_FEATURES,
    ExportContext,
    is_model_file,
    variant_file,
)
from thali.core.files import fsync_dir, pid_alive
from thali.core.images import DEFAULT_CROP_PCT
from thali.core.manifest import CALIBRATION, CARD, LABELS, PREPROCESS, Manifest, Preprocess
from thali.core.quiet import no_update_checks
from thali.core.registry import Registries

if TYPE_CHECKING:
    from thali.core.training.data import Split

from .data import calibration_batches, fingerprint, load_validation, run_split
from .gate import gate, run_onnx
from .unknown import fit_unknown

FP32_STEPS = ("onnx", "ort_optimize")
#: Staging folders beside the destination: ``.thali-export-<pid>-…``; a killed export's are swept.
STAGING_PREFIX = ".thali-export-"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocess_spec(preprocess: dict[str, Any]) -> dict[str, Any]:
    """What a server needs to prepare an image exactly like evaluation did."""
    _, h, w = (int(v) for v in preprocess["input_size"])
    crop_pct = float(preprocess.get("crop_pct", DEFAULT_CROP_PCT))
    return {
        "input_size": [3, h, w],
        "resize_shorter_side": round(min(h, w) / crop_pct),
        "crop_pct": crop_pct,
        "center_crop": [h, w],
        "interpolation": str(preprocess.get("interpolation", "bilinear")),
        "mean": [float(v) for v in preprocess["mean"]],
        "std": [float(v) for v in preprocess["std"]],
        "pixel_scale": 255.0,
        "channel_order": "RGB",
        "layout": "NCHW",
        "input_name": INPUT,
        "output_name": LOGITS,
    }


def labels_spec(config: DomainConfig) -> dict[str, Any]:
    return {
        "domain": config.name,
        "classes": [
            {"id": i, "name": c.name, "display_name": c.display_name, "description": c.description}
            for i, c in enumerate(config.classes)
        ],
    }


def _spread(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


@dataclass
class _Setup:
    """What every phase of one export reads: the run, its config after ``--set``, the validation split."""

    run_dir: Path
    out_dir: Path
    config: DomainConfig
    model: Any
    temperature: float
    split: Split
    root: Path
    transform: Any
    limits: Any
    val: Any
    variants: list[str]


@dataclass
class ExportResult:
    """The variants an export keeps and drops: ``accepted`` (name -> report, metrics, gate, path) with
    fp32 first, ``rejected`` (name -> reasons and, when it ran, its metrics and gate)."""

    accepted: dict[str, dict[str, Any]]
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def reference(self) -> dict[str, Any]:
        """fp32's scores: what every other variant is gated against."""
        return self.accepted["fp32"]["metrics"]


def export_run(
    run_dir: Path,
    registries: Registries,
    *,
    out_dir: Path | None = None,
    data: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Export ``run_dir`` (a training run) to ``out_dir`` (default ``RUN_DIR/export``); returns the report.

    Phases: load the run and its validation split; make fp32 (``onnx``, ``ort_optimize``) and score it;
    make and gate every other variant; copy what passed; fit the unknown score; write the metadata
    files and the manifest (``card.json``); rename the staged folder into place."""
    no_update_checks()
    from tqdm import tqdm

    setup = _load(Path(run_dir), registries, out_dir, data, overrides)
    bar = tqdm(total=4 + 2 * len(setup.variants), desc="export", unit="step", disable=not progress)
    bar.set_postfix_str("loading validation images")
    setup.val = load_validation(setup.split, setup.transform, limits=setup.limits)
    bar.update()
    setup.out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(setup.out_dir.parent)
    work = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=setup.out_dir.parent))
    package = work / "package"
    package.mkdir()
    try:
        context = _context(setup, work)
        result = _make_variants(setup, registries, context, bar)
        models = _copy_models(result, package)
        bar.set_postfix_str("unknown score")
        unknown_calibration, unknown_report = fit_unknown(
            package / variant_file("fp32"),
            setup.split,
            setup.root,
            setup.transform,
            setup.val,
            setup.temperature,
            setup.config.export.unknown,
            variants={v: package / variant_file(v) for v in result.accepted if v != "fp32"},
            stages=context.reports["onnx"].get(STAGE_FEATURES, []),
            limits=setup.limits,
            progress=progress,
        )
        bar.update()
        files = _write_metadata(setup, package, unknown_calibration)
        report = _without_folders(_report(setup, context, result, models, files, unknown_report), work)
        manifest = _manifest(setup, report)
        (package / CARD).write_bytes(manifest.to_json())
        report["files"][CARD] = sha256(package / CARD)
        (package / EXPORT_REPORT).write_text(json.dumps(report, indent=1, default=float))
        _replace(package, setup.out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bar.close()
    report["out_dir"] = str(setup.out_dir)
    return report


def _load(
    run_dir: Path,
    registries: Registries,
    out_dir: Path | None,
    data: str | Path | None,
    overrides: list[str] | tuple[str, ...],
) -> _Setup:
    from thali.core.training.evaluate import load_run
    from thali.core.training.transforms import eval_transform

    run = load_run(run_dir, registries, overrides)
    check_components(run.config, registries)
    out_dir = Path(out_dir or run_dir / "export")
    check_out_dir(out_dir)
    split, root = run_split(run_dir, data)
    return _Setup(
        run_dir=run_dir,
        out_dir=out_dir,
        config=run.config,
        model=run.model,
        temperature=run.temperature,
        split=split,
        root=root,
        transform=eval_transform(run.model.preprocess),
        limits=run.config.dataset.image_limits(),
        val=None,
        variants=list(dict.fromkeys(v for v in run.config.export.variants if v != "fp32")),
    )


def _context(setup: _Setup, work: Path) -> ExportContext:
    import torch

    settings, config = setup.config.export, setup.config
    return ExportContext(
        model=setup.model,
        example=torch.from_numpy(setup.val.images[_spread(len(setup.val.images), 16)]),
        out_dir=work,
        opset=settings.opset,
        settings=settings,
        calibration=lambda: calibration_batches(
            setup.split,
            setup.transform,
            settings.calibration_images,
            seed=config.training.seed,
            limits=setup.limits,
        ),
    )


def _make_variants(setup: _Setup, registries: Registries, context: ExportContext, bar: Any) -> ExportResult:
    """fp32 (no fallback: a failure stops the export), then each variant, gated against fp32."""
    from thali.core.metrics import summarize

    val, classes, temperature = setup.val, setup.config.class_names, setup.temperature
    for name in FP32_STEPS:
        bar.set_postfix_str(name)
        context.reports[name] = _run_step(registries, name, context)
        bar.update()
    bar.set_postfix_str("scoring fp32 on the validation split")
    reference = summarize(run_onnx(context.artifacts["fp32"], val.images), val.labels, classes, temperature)
    fp32 = {
        "report": context.reports["ort_optimize"],
        "metrics": reference,
        "path": context.artifacts["fp32"],
    }
    result = ExportResult(accepted={"fp32": fp32})
    for variant in setup.variants:
        bar.set_postfix_str(variant)
        _make_variant(setup, registries, context, variant, result, bar)
    return result


def _make_variant(
    setup: _Setup,
    registries: Registries,
    context: ExportContext,
    variant: str,
    result: ExportResult,
    bar: Any,
) -> None:
    from thali.core.metrics import summarize

    val, classes = setup.val, setup.config.class_names
    try:
        exporter = registries.exporters.create(variant)
        context.reports[variant] = exporter.run(context)
        produced = context.artifacts[
            getattr(exporter, "produces", None) or variant
        ]  # optional: defaults to its name
    except ConfigError:
        raise
    except Exception as exc:  # a broken exporter (a plugin's too) costs its variant, not the export
        result.rejected[variant] = {"reasons": [f"the exporter failed: {_failure(registries, variant, exc)}"]}
        bar.update(2)
        return
    bar.update()
    bar.set_postfix_str(f"gating {variant}")
    try:
        scores = summarize(run_onnx(produced, val.images), val.labels, classes, setup.temperature)
    except Exception as exc:  # the file it wrote does not even run
        result.rejected[variant] = {"reasons": [f"ONNX Runtime could not run it: {one_line(exc)}"]}
        bar.update()
        return
    verdict = gate(scores, result.reference, setup.config.export.gate)
    bar.update()
    entry = {"report": context.reports[variant], "metrics": scores, "gate": verdict, "path": produced}
    if verdict["passed"]:
        result.accepted[variant] = entry
    else:
        result.rejected[variant] = {"reasons": verdict["reasons"], "metrics": scores, "gate": verdict}


def _copy_models(result: ExportResult, package: Path) -> dict[str, Any]:
    """Copy the accepted variants into the package; export.json's ``variants`` entries."""
    fp32_size = result.accepted["fp32"]["path"].stat().st_size
    models: dict[str, Any] = {}
    for variant, entry in result.accepted.items():
        target = package / variant_file(variant)
        shutil.copy2(entry["path"], target)
        size = target.stat().st_size
        models[variant] = {
            "file": target.name,
            **{k: v for k, v in entry.items() if k != "path"},
            "size_bytes": size,
            "size_ratio_vs_fp32": round(fp32_size / size, 2),
            "sha256": sha256(target),
        }
    return models


def _preprocess(setup: _Setup) -> Preprocess:
    explain = CAM if setup.config.export.explain else None
    return Preprocess.model_validate({**preprocess_spec(setup.model.preprocess), "explain_output": explain})


def _write_metadata(setup: _Setup, package: Path, unknown_calibration: dict[str, Any]) -> dict[str, str]:
    """labels.json, preprocess.json, calibration.json and the run's config.yaml; name -> sha256."""
    metadata = {
        LABELS: json.dumps(labels_spec(setup.config), indent=1),
        PREPROCESS: json.dumps(_preprocess(setup).model_dump(mode="json"), indent=1),
        CALIBRATION: json.dumps({"temperature": setup.temperature, **unknown_calibration}, indent=1),
        EXPORT_CONFIG: (setup.run_dir / EXPORT_CONFIG).read_text(encoding="utf-8"),  # validated by load_run
    }
    for name, text in metadata.items():
        (package / name).write_text(text, encoding="utf-8")
    return {name: sha256(package / name) for name in metadata}


def _report(
    setup: _Setup,
    context: ExportContext,
    result: ExportResult,
    models: dict[str, Any],
    files: dict[str, str],
    unknown_report: dict[str, Any],
) -> dict[str, Any]:
    """export.json: what the export did, step by step (the manifest is what the package is)."""
    from thali.core import __version__

    val = setup.val
    return {
        "domain": setup.config.name,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "thali_version": __version__,
        "lineage": {
            "run_id": setup.run_dir.resolve().name,
            "checkpoint": "best.pt",
            "checkpoint_sha256": sha256(setup.run_dir / "best.pt"),
        },
        "dataset": {
            "fingerprint": fingerprint(setup.run_dir),
            "validation_images": len(val.labels),
            "validation_skipped": val.skipped,
        },
        "parity": {k: context.reports["onnx"][k] for k in ("max_abs_logit_diff", "top1_agreement")},
        "unknown": unknown_report,
        "steps": {name: context.reports[name] for name in FP32_STEPS},
        "variants": models,
        "files": files,
        "rejected": result.rejected,
        "warnings": context.warnings + ([val.problems] if val.problems else []),
    }


def _without_folders(node: Any, work: Path) -> Any:
    """Exporters' reports name the files they wrote in the staging folder: keep the file name only, so
    export.json (and what is made from it) names no folder of this machine."""
    if isinstance(node, dict):
        return {k: _without_folders(v, work) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_folders(v, work) for v in node]
    if isinstance(node, str | Path) and str(node).startswith(str(work) + os.sep):
        return Path(node).name
    return node


def _manifest(setup: _Setup, report: dict[str, Any]) -> Manifest:
    """The package's manifest, unnumbered: ``thali publish`` gives it its version."""
    config = setup.config
    metric_keys = ("top1", "top5", "ece", "nll", "per_class", "confusion_matrix")
    variants = {
        name: {
            "file": entry["file"],
            "size_bytes": entry["size_bytes"],
            **{k: entry["metrics"].get(k) for k in metric_keys},
            "gate": entry.get("gate"),
        }
        for name, entry in report["variants"].items()
    }
    return Manifest.model_validate(
        {
            "domain": config.name,
            "description": config.description,
            "licence": config.dataset.licence or "not stated",
            "classes": labels_spec(config)["classes"],
            "preprocess": _preprocess(setup),
            "serving": config.serving.model_dump(),
            "variants": variants,
            "rejected_variants": {k: v.get("reasons", []) for k, v in report["rejected"].items()},
            "parity": report["parity"],
            "unknown": report["unknown"],
            "dataset": report["dataset"],
            "image_caps": {
                "max_pixels": config.dataset.max_image_pixels,
                "max_bytes": config.dataset.max_image_bytes,
            },
            "lineage": {
                **report["lineage"],
                "data_fingerprint": report["dataset"]["fingerprint"],
                "exported_at": report["created_at"],
                "exported_with": report["thali_version"],
            },
        }
    )


def _replace(source: Path, target: Path) -> None:
    """Put ``source`` at ``target``; an older export there is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f"{STAGING_PREFIX}{os.getpid()}-old-{target.name}")
        target.rename(old)
    source.rename(target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that exists and is not an export: replacing it would delete someone's files."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ConfigError(f"--out {out_dir}: exists and is not a folder; choose another place")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    strangers = sorted(p.name for p in out_dir.iterdir() if not _export_file(p))
    if not (out_dir / EXPORT_REPORT).is_file() or strangers:
        shown = ", ".join(strangers[:5]) + (" …" if len(strangers) > 5 else "")
        raise ConfigError(
            f"--out {out_dir}: exists and is not an export folder"
            + (f" (it holds {shown})" if shown else " (no export.json)")
            + "; an export replaces its folder whole, so choose a new or empty folder"
        )


def _export_file(path: Path) -> bool:
    known = {EXPORT_REPORT, EXPORT_CONFIG, CARD, *METADATA_FILES}
    return path.is_file() and not path.is_symlink() and (path.name in known or is_model_file(path.name))


def sweep_stale(folder: Path) -> list[Path]:
    """Remove staging folders that killed exports left in ``folder`` (their process is gone)."""
    removed = []
    for path in folder.glob(f"{STAGING_PREFIX}*"):
        pid = path.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if path.is_dir() and not path.is_symlink() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _failure(registries: Registries, name: str, exc: BaseException) -> str:
    """One line: what failed, in which plugin."""
    if isinstance(exc, ThaliError):
        return exc.message
    plugin = registries.exporters.get(name).plugin if name in registries.exporters else "?"
    return f"exporter {name!r} of plugin {plugin!r} raised {one_line(exc)}"


def _run_step(registries: Registries, name: str, context: ExportContext) -> dict[str, Any]:
    """One fp32 step; it has no fallback, so a failure stops the export with one line naming the plugin."""
    try:
        return registries.exporters.create(name).run(context)
    except ThaliError:
        raise
    except Exception as exc:
        raise PluginError(f"export step {name!r} failed: {_failure(registries, name, exc)}") from exc
