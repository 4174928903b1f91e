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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.config import DomainConfig, check_components
from thali.core.errors import ConfigError, ThaliError
from thali.core.export import ExportContext, variant_file
from thali.core.registry import Registries

from .data import calibration_batches, fingerprint, load_validation, run_split
from .gate import gate, run_onnx

FP32_STEPS = ("onnx", "ort_optimize")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocess_spec(preprocess: dict[str, Any]) -> dict[str, Any]:
    """What a server needs to prepare an image exactly like evaluation did."""
    _, h, w = (int(v) for v in preprocess["input_size"])
    crop_pct = float(preprocess.get("crop_pct", 0.875))
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


def unknown_threshold(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """5th percentile of the calibrated confidence of correct validation predictions: below it, a
    prediction is less sure than 95 % of the right answers were."""
    from thali.core.training.metrics import softmax

    probs = softmax(logits, temperature)
    right = probs.argmax(1) == labels
    confidence = probs.max(1)[right] if right.any() else probs.max(1)
    return float(np.percentile(confidence, 5))


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
    split, root = run_split(run_dir, data)
    classes = config.class_names

    bar = tqdm(total=3 + 2 * len(variants), desc="export", unit="step", disable=not progress)

    def step(text: str) -> None:
        bar.set_postfix_str(text)

    step("loading validation images")
    transform = eval_transform(model.preprocess)
    val = load_validation(split, transform)
    bar.update()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
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
                split, transform, settings.calibration_images, seed=config.training.seed
            ),
        )
        for name in FP32_STEPS:
            step(name)
            context.reports[name] = registries.exporters.create(name).run(context)
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
            exporter = registries.exporters.create(variant)
            try:
                context.reports[variant] = exporter.run(context)
            except ConfigError:
                raise
            except ThaliError as exc:
                rejected[variant] = {"reasons": [f"the exporter failed: {exc.message}"]}
                bar.update(2)
                continue
            bar.update()
            step(f"gating {variant}")
            produced = context.artifacts[getattr(exporter, "produces", None) or variant]
            scores = summarize(run_onnx(produced, val.images), val.labels, classes, temperature)
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
        threshold = unknown_threshold(reference_logits, val.labels, temperature)
        (package / "labels.json").write_text(json.dumps(labels_spec(config), indent=1))
        (package / "preprocess.json").write_text(json.dumps(preprocess_spec(model.preprocess), indent=1))
        (package / "calibration.json").write_text(
            json.dumps({"temperature": temperature, "unknown_threshold": threshold}, indent=1)
        )
        (package / "config.yaml").write_text((run_dir / "config.yaml").read_text())
        report = {
            "domain": config.name,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
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
            "steps": {name: context.reports[name] for name in FP32_STEPS},
            "variants": results,
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
        old = target.with_name(f".{target.name}.old-{dt.datetime.now():%H%M%S%f}")
        target.rename(old)
    source.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
