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
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.config import DomainConfig, check_components
from thali.core.errors import ConfigError, PluginError, ThaliError, one_line
from thali.core.export import (
    EXPORT_CONFIG,
    EXPORT_REPORT,
    METADATA_FILES,
    ExportContext,
    is_model_file,
    variant_file,
)
from thali.core.files import fsync_dir, pid_alive
from thali.core.images import DEFAULT_CROP_PCT
from thali.core.quiet import no_update_checks
from thali.core.registry import Registries

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
        "input_name": "input",
        "output_name": "logits",
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


def export_run(
    run_dir: Path,
    registries: Registries,
    *,
    out_dir: Path | None = None,
    data: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Export ``run_dir`` (a training run) to ``out_dir`` (default ``RUN_DIR/export``); returns the report."""
    no_update_checks()
    import torch
    from tqdm import tqdm

    from thali.core import __version__
    from thali.core.training.evaluate import load_run
    from thali.core.training.metrics import summarize
    from thali.core.training.transforms import eval_transform

    run_dir = Path(run_dir)
    run = load_run(run_dir, registries, overrides)
    config, model, temperature = run.config, run.model, run.temperature
    check_components(config, registries)
    settings = config.export
    variants = list(dict.fromkeys(v for v in settings.variants if v != "fp32"))
    out_dir = Path(out_dir or run_dir / "export")
    check_out_dir(out_dir)
    split, root = run_split(run_dir, data)
    classes = config.class_names

    bar = tqdm(total=4 + 2 * len(variants), desc="export", unit="step", disable=not progress)

    def step(text: str) -> None:
        bar.set_postfix_str(text)

    step("loading validation images")
    transform = eval_transform(model.preprocess)
    limits = config.dataset.image_limits()
    val = load_validation(split, transform, limits=limits)
    bar.update()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir.parent)
    work = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir.parent))
    package = work / "package"
    package.mkdir()
    try:
        context = ExportContext(
            model=model,
            example=torch.from_numpy(val.images[_spread(len(val.images), 16)]),
            out_dir=work,
            opset=settings.opset,
            settings=settings,
            calibration=lambda: calibration_batches(
                split, transform, settings.calibration_images, seed=config.training.seed, limits=limits
            ),
        )
        for name in FP32_STEPS:
            step(name)
            context.reports[name] = _run_step(registries, name, context)
            bar.update()
        step("scoring fp32 on the validation split")
        reference_logits = run_onnx(context.artifacts["fp32"], val.images)
        reference = summarize(reference_logits, val.labels, classes, temperature)
        accepted: dict[str, Any] = {
            "fp32": {
                "report": context.reports["ort_optimize"],
                "metrics": reference,
                "path": context.artifacts["fp32"],
            }
        }
        rejected: dict[str, dict[str, Any]] = {}
        for variant in variants:
            step(variant)
            try:
                exporter = registries.exporters.create(variant)
                context.reports[variant] = exporter.run(context)
                produced = context.artifacts[getattr(exporter, "produces", None) or variant]
            except ConfigError:
                raise
            except Exception as exc:  # a broken exporter (a plugin's too) costs its variant, not the export
                reason = f"the exporter failed: {_failure(registries, variant, exc)}"
                rejected[variant] = {"reasons": [reason]}
                bar.update(2)
                continue
            bar.update()
            step(f"gating {variant}")
            try:
                scores = summarize(run_onnx(produced, val.images), val.labels, classes, temperature)
            except Exception as exc:  # the file it wrote does not even run
                rejected[variant] = {"reasons": [f"ONNX Runtime could not run it: {one_line(exc)}"]}
                bar.update()
                continue
            verdict = gate(scores, reference, settings.gate)
            bar.update()
            entry = {"report": context.reports[variant], "metrics": scores, "gate": verdict, "path": produced}
            if verdict["passed"]:
                accepted[variant] = entry
            else:
                rejected[variant] = {"reasons": verdict["reasons"], "metrics": scores, "gate": verdict}
        fp32_size = accepted["fp32"]["path"].stat().st_size
        results: dict[str, Any] = {}
        for variant, entry in accepted.items():
            target = package / variant_file(variant)
            shutil.copy2(entry.pop("path"), target)
            size = target.stat().st_size
            results[variant] = {
                "file": target.name,
                **entry,
                "size_bytes": size,
                "size_ratio_vs_fp32": round(fp32_size / size, 2),
                "sha256": sha256(target),
            }
        step("unknown score")
        unknown_calibration, unknown_report = fit_unknown(
            package / variant_file("fp32"),
            split,
            root,
            transform,
            val,
            temperature,
            settings.unknown,
            variants={v: package / variant_file(v) for v in accepted if v != "fp32"},
            stages=context.reports["onnx"].get("stage_features", []),
            limits=limits,
            progress=progress,
        )
        bar.update()
        metadata = {
            "labels.json": json.dumps(labels_spec(config), indent=1),
            "preprocess.json": json.dumps(
                {**preprocess_spec(model.preprocess), "explain_output": "cam" if settings.explain else None},
                indent=1,
            ),
            "calibration.json": json.dumps({"temperature": temperature, **unknown_calibration}, indent=1),
            EXPORT_CONFIG: (run_dir / EXPORT_CONFIG).read_text(encoding="utf-8"),  # validated by load_run
        }
        for name, text in metadata.items():
            (package / name).write_text(text, encoding="utf-8")
        report = {
            "domain": config.name,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "thali_version": __version__,
            "lineage": {
                "run": str(run_dir.resolve()),
                "checkpoint": "best.pt",
                "checkpoint_sha256": sha256(run_dir / "best.pt"),
            },
            "dataset": {
                "root": str(root),
                "fingerprint": fingerprint(run_dir),
                "validation_images": len(val.labels),
                "validation_skipped": val.skipped,
            },
            "parity": {k: context.reports["onnx"][k] for k in ("max_abs_logit_diff", "top1_agreement")},
            "unknown": unknown_report,
            "steps": {name: context.reports[name] for name in FP32_STEPS},
            "variants": results,
            "files": {name: sha256(package / name) for name in metadata},
            "rejected": rejected,
            "warnings": context.warnings + ([val.problems] if val.problems else []),
        }
        (package / "export.json").write_text(json.dumps(report, indent=1, default=float))
        _replace(package, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bar.close()
    report["out_dir"] = str(out_dir)
    return report


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
    known = {EXPORT_REPORT, EXPORT_CONFIG, *METADATA_FILES}
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
