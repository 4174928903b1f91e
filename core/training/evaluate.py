"""``thali evaluate``: score a training run on any ImageFolder directory with the training metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thali.core.config import DomainConfig, load_config
from thali.core.errors import DataError, NotAvailableError
from thali.core.registry import Registries

from . import checkpoint as ckpt
from .data import ImageDataset, make_loader, report_problems, scoring_samples, verify_images
from .metrics import summarize
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

    logits, labels = [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            if batch["images"] is not None:
                logits.append(model(batch["images"]))
                labels.append(batch["labels"])
    if not logits:
        raise DataError(f"{data_dir}: no readable images")
    result = summarize(torch.cat(logits).numpy(), torch.cat(labels).numpy(), classes, temperature)
    result["skipped"] = len(problems)
    if message := report_problems(problems):
        result["problems"] = message
    result["data"] = str(data_dir)
    result["run"] = str(run_dir)
    return result
