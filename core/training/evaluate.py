"""``thali evaluate``: score a training run on any ImageFolder directory with the training metrics."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thali.core.config import DomainConfig, load_config
from thali.core.errors import DataError, NotAvailableError
from thali.core.metrics import summarize
from thali.core.registry import Registries
from thali.core.samples import Sample, report_problems, scoring_samples, verify_images

from . import checkpoint as ckpt
from .data import ImageDataset, make_loader, read_split
from .model import Classifier, build_classifier
from .transforms import eval_transform


@dataclass
class TrainedRun:
    """What a finished run holds for scoring and export: its resolved config, the best model (eval
    mode) and the temperature fitted on validation (1.0 if the run has none)."""

    config: DomainConfig
    model: Classifier
    temperature: float


def load_run(run_dir: Path, registries: Registries, overrides: Sequence[str] = ()) -> TrainedRun:
    """Rebuild the model of a training run from its ``config.yaml`` and ``best.pt``."""
    run_dir = Path(run_dir)
    if not (run_dir / "best.pt").is_file():
        if (run_dir / "model.onnx").is_file():
            raise NotAvailableError(f"{run_dir}: this is an export; score exports with `thali bench`")
        raise DataError(f"{run_dir}: not a training run (no best.pt); pass the folder `thali train` wrote")
    config = load_config(run_dir / "config.yaml", ["model.pretrained=none", *overrides])
    model = build_classifier(config, registries)
    ckpt.load_weights(model, ckpt.load(run_dir / "best.pt")["model"], run_dir / "best.pt")
    model.eval()
    calibration = run_dir / "calibration.json"
    temperature = json.loads(calibration.read_text())["temperature"] if calibration.is_file() else 1.0
    return TrainedRun(config, model, float(temperature))


def cross_summary(
    logits: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    cross: Sequence[int],
    groups: Mapping[int, str],
    classes: Sequence[str],
    temperature: float = 1.0,
) -> dict[str, Any] | None:
    """Metrics on the cross-collection images alone (rows whose ``indices`` are in ``cross``): top-1,
    top-5, NLL, ECE and, per class with such images, its accuracy, image count and held-out group.
    ``None`` when none of them was scored."""
    mask = np.isin(np.asarray(indices), np.asarray(list(cross), dtype=np.int64))
    if not mask.any():
        return None
    full = summarize(np.asarray(logits)[mask], np.asarray(labels)[mask], classes, temperature)
    per_class = {
        name: {"accuracy": stats["recall"], "support": stats["support"], "group": groups.get(i)}
        for i, (name, stats) in enumerate(full["per_class"].items())
        if stats["support"]
    }
    keys = ("images", "top1", "top5", "nll", "ece", "temperature")
    return {
        **{k: full[k] for k in keys},
        "classes": len(per_class),
        "per_class": per_class,
        "per_collection": per_collection(per_class),
    }


def per_collection(per_class: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Top-1 per held-out collection, from :func:`cross_summary`'s ``per_class`` (each class holds out one
    collection, so a collection's photos are those of the classes holding it out): ``{collection:
    {"images", "top1", "classes"}}``, collections by name."""
    found: dict[str, dict[str, Any]] = {}
    for name, stats in per_class.items():
        entry = found.setdefault(str(stats.get("group")), {"images": 0, "right": 0.0, "classes": []})
        entry["images"] += int(stats["support"])
        entry["right"] += float(stats["accuracy"]) * int(stats["support"])
        entry["classes"].append(name)
    return {
        group: {"images": e["images"], "top1": e["right"] / e["images"], "classes": e["classes"]}
        for group, e in sorted(found.items())
        if e["images"]
    }


def cross_line(summary: Mapping[str, Any]) -> str:
    """The one-line form of :func:`cross_summary` that ``thali train`` and ``thali evaluate`` print."""
    return (
        f"cross-collection val ({summary['images']} images of {summary['classes']} classes, collections "
        f"never trained on): top-1 {summary['top1']:.3f}  top-5 {summary['top5']:.3f}  "
        f"ECE {summary['ece']:.3f}"
    ) + "".join(
        f"\n  {group}: top-1 {entry['top1']:.3f} ({entry['images']} images)"
        for group, entry in (summary.get("per_collection") or {}).items()
    )


def _run_cross_samples(run_dir: Path, data_dir: Path, samples: Sequence[Sample]) -> tuple[list[int], dict]:
    """Which of ``samples`` are the run's cross-collection validation images: only when ``data_dir`` is
    the folder the run was split from (a file name alone could match another dataset's photo)."""
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        return [], {}
    data = json.loads(split_file.read_text())
    if not data.get("val_cross") or Path(data.get("root", "")).resolve() != data_dir.resolve():
        return [], {}
    split = read_split(split_file, data_dir)
    wanted = {(Path(split.val[i][0]).absolute(), split.val[i][1]) for i in split.val_cross}
    found = [i for i, (path, label) in enumerate(samples) if (Path(path).absolute(), label) in wanted]
    return found, split.groups


def evaluate_run(
    run_dir: Path, data_dir: Path, registries: Registries, batch_size: int = 32, progress: bool = True
) -> dict[str, Any]:
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run = load_run(run_dir, registries)
    config, model, temperature = run.config, run.model, run.temperature
    classes = config.class_names
    samples = scoring_samples(registries, data_dir, classes, config.name)
    limits = config.dataset.image_limits()
    samples, problems = verify_images(samples, progress=progress, limits=limits)
    loader = make_loader(
        ImageDataset(samples, eval_transform(model.preprocess), limits=limits),
        batch_size,
        shuffle=False,
        seed=0,
        num_workers=0,
    )
    from tqdm import tqdm

    logits, labels, indices = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            if batch["images"] is not None:
                logits.append(model(batch["images"]))
                labels.append(batch["labels"])
                indices.append(batch["indices"])
    if not logits:
        raise DataError(f"{data_dir}: no readable images")
    all_logits, all_labels = torch.cat(logits).numpy(), torch.cat(labels).numpy()
    result = summarize(all_logits, all_labels, classes, temperature)
    cross, groups = _run_cross_samples(run_dir, data_dir, samples)
    if cross:  # the run's held-out collections are in this folder: score them on their own too
        summary = cross_summary(
            all_logits, all_labels, torch.cat(indices).numpy(), cross, groups, classes, temperature
        )
        if summary:
            result["val_cross"] = summary
    result["skipped"] = len(problems)
    if message := report_problems(problems):
        result["problems"] = message
    result["data"] = str(data_dir)
    result["run"] = str(run_dir)
    return result
