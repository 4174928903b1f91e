"""WiSE-FT (Wortsman et al., CVPR 2022): the weights of two runs of one model, interpolated.

``weights(alpha) = (1 - alpha) * probe + alpha * tuned``: ``probe`` is a run that trained the head
alone on frozen features (a linear probe), ``tuned`` one that fine-tuned more of the network (ideally
from that probe's head: LP-FT). The mix keeps much of the probe's robustness on photos unlike the
training ones and much of the fine-tuned accuracy. :func:`wise_ft` writes it as a run folder that
``thali evaluate`` and ``thali export`` take like any other: ``config.yaml`` and ``split.json`` of the
tuned run, ``best.pt`` with the mixed weights, ``calibration.json`` with a temperature fitted again for
them and ``metrics.json`` as ``thali train`` writes it (with a cross-collection split, ``val_cross``: the
held-out collections, scored, never chosen on).

``alpha`` is given, or chosen from a grid on the validation photos of the *training* collections by
:func:`choose_alpha`: of the mixes whose top-1 there is within one standard error of the best, the one
nearest 0.5. Those photos are few (202 of south_asian_food's 1,195 on its cross-collection split), so
top-1 differences of a point or two between mixes are noise, and they favour the fine-tuned end by
construction (it was fitted to those collections); the paper finds the middle of the path the robust
default. On south_asian_food's split the plain arg-max picked alpha 1 (90.1 % against 89.6 % at 0.5,
one photo apart) while the held-out collections read 79.6 % at 1 and 82.4 % at 0.5.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thali.core.errors import DataError
from thali.core.files import write_atomic
from thali.core.registry import Registries

from . import checkpoint as ckpt

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate(probe: Mapping[str, Any], tuned: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """``(1 - alpha) * probe + alpha * tuned`` for every floating-point tensor; other entries (counters
    such as BatchNorm's ``num_batches_tracked``) come from ``tuned``. The two must hold the same names
    and shapes (two runs of one model)."""
    if not 0.0 <= alpha <= 1.0:
        raise DataError(f"wise-ft: alpha {alpha:g} is outside [0, 1]")
    if set(probe) != set(tuned):
        extra = sorted(set(probe) ^ set(tuned))[:3]
        raise DataError(f"wise-ft: the two runs are not of one model (weights differ: {', '.join(extra)})")
    mixed: dict[str, Any] = {}
    for name, b in tuned.items():
        a = probe[name]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            raise DataError(f"wise-ft: the two runs are not of one model ({name} differs)")
        if b.is_floating_point():
            mixed[name] = torch.lerp(a.to(b.dtype), b, float(alpha))
        else:
            mixed[name] = b.clone()
    return mixed


def choose_alpha(top1_by_alpha: Mapping[float, float], images: int) -> float:
    """The mix nearest 0.5 among those whose top-1 on ``images`` photos is within one standard error
    (``sqrt(p (1 - p) / n)`` at the best top-1 ``p``) of the best: the one-standard-error rule, so that
    a difference the choosing photos cannot resolve does not pull the choice to an endpoint."""
    if not top1_by_alpha or images <= 0:
        raise DataError("wise-ft: nothing to choose alpha on")
    best = max(top1_by_alpha.values())
    margin = float(np.sqrt(best * (1.0 - best) / images))
    near = [a for a, top1 in top1_by_alpha.items() if top1 >= best - margin - 1e-12]
    return min(near, key=lambda a: (abs(a - 0.5), -top1_by_alpha[a], -a))


def wise_ft(
    probe_run: Path,
    tuned_run: Path,
    out: Path,
    registries: Registries,
    alpha: float | None = None,
    alphas: Sequence[float] = ALPHAS,
    data: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the interpolated run to ``out`` (a new folder); returns what was chosen and measured."""
    from .data import read_split
    from .evaluate import load_run

    probe_run, tuned_run, out = Path(probe_run), Path(tuned_run), Path(out)
    if out.exists():
        raise DataError(f"wise-ft: {out} exists; choose a new folder")
    probe = ckpt.load(probe_run / "best.pt")["model"]
    run = load_run(tuned_run, registries)
    tuned = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    interpolate(probe, tuned, 0.0)  # the same model, or one line saying where they differ
    split = read_split(tuned_run / "split.json", data)
    if not split.val:
        raise DataError(f"{tuned_run}: its split has no validation photos to choose on")
    grid = [float(alpha)] if alpha is not None else sorted({float(a) for a in alphas})
    mixes = {a: interpolate(probe, tuned, a) for a in grid}
    scored = _score_mixes(run, mixes, split, tuned_run, progress)
    top1 = {a: s.top1 for a, s in scored.items()}
    choosing = int(scored[grid[0]].chooses.sum())  # the same photos for every mix
    chosen = choose_alpha(top1, choosing)
    record = {
        "probe_run": str(probe_run),
        "tuned_run": str(tuned_run),
        "alpha": chosen,
        "top1_by_alpha": {f"{a:g}": t for a, t in top1.items()},
        "chosen_on": f"{choosing} validation photos of the training collections",
        "rule": "nearest 0.5 within one standard error of the best top-1" if alpha is None else "given",
    }
    metrics = _mix_metrics(run.config, scored[chosen], split, record)
    summary = {**record, "top1": top1[chosen], "temperature": metrics["calibration"]["temperature"]}
    if cross := metrics.get("val_cross"):
        summary["val_cross"] = {k: cross[k] for k in ("images", "top1", "top5", "ece", "per_collection")}
    _write_run(out, tuned_run, mixes[chosen], record, metrics, summary)
    return summary


@dataclass
class _Scored:
    """One mix's logits on the validation split, and which of its photos may choose."""

    logits: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    chooses: np.ndarray

    @property
    def top1(self) -> float:
        right = self.logits[self.chooses].argmax(1) == self.labels[self.chooses]
        return float(right.mean())


def _score_mixes(
    run: Any, mixes: Mapping[float, Mapping[str, Any]], split: Any, tuned_run: Path, progress: bool
) -> dict[float, _Scored]:
    """Every mix on the whole validation split, each photo decoded once and run through every mix; a
    cross-collection split's held-out photos are scored, never chosen on."""
    from tqdm import tqdm

    from .data import ImageDataset, make_loader
    from .transforms import eval_transform

    limits = run.config.dataset.image_limits()
    dataset = ImageDataset(split.val, eval_transform(run.model.preprocess), limits=limits)
    loader = make_loader(dataset, 32, shuffle=False, seed=0, num_workers=0)
    outs: dict[float, list[torch.Tensor]] = {a: [] for a in mixes}
    labels, indices = [], []
    run.model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="wise-ft", unit="batch", disable=not progress, leave=False):
            if batch["images"] is None:
                continue
            for a, weights in mixes.items():
                ckpt.load_weights(run.model, weights, tuned_run / "best.pt")
                outs[a].append(run.model(batch["images"]))
            labels.append(batch["labels"])
            indices.append(batch["indices"])
    if not labels:
        raise DataError(f"{tuned_run}: none of the validation photos could be read")
    index, truth = torch.cat(indices).numpy(), torch.cat(labels).numpy()
    chooses = ~np.isin(index, np.asarray(split.val_cross, dtype=np.int64))
    if not chooses.any():
        raise DataError(f"{tuned_run}: no validation photos of the training collections to choose on")
    return {a: _Scored(torch.cat(outs[a]).numpy(), truth, index, chooses) for a in mixes}


def _mix_metrics(config: Any, mix: _Scored, split: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics.json`` of the chosen mix as ``thali train`` writes it: the temperature fitted on the
    photos that choose, the whole split calibrated, the held-out collections on their own."""
    from thali.core.metrics import calibrated_summary

    from .evaluate import cross_summary

    classes = config.class_names
    calibrated, calibration = calibrated_summary(mix.logits, mix.labels, classes, mix.chooses)
    metrics: dict[str, Any] = {
        "domain": config.name,
        "wise_ft": dict(record),
        "val": calibrated,
        "calibration": calibration,
    }
    if split.val_cross:
        temperature = calibration["temperature"]
        cross = cross_summary(
            mix.logits, mix.labels, mix.indices, split.val_cross, split.groups, classes, temperature
        )
        if cross:
            metrics["val_cross"] = cross
    return metrics


def _write_run(
    out: Path,
    tuned_run: Path,
    mixed: Mapping[str, Any],
    record: Mapping[str, Any],
    metrics: Mapping[str, Any],
    summary: Mapping[str, Any],
) -> None:
    """The run folder, written beside ``out`` and renamed into place: an interrupted mix leaves no
    half-written run that ``thali export`` would take."""
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for name in ("config.yaml", "split.json"):
            shutil.copy2(tuned_run / name, staging / name)
        ckpt.save_atomic({"model": dict(mixed), "wise_ft": dict(record)}, staging / "best.pt")
        temperature = metrics["calibration"]["temperature"]
        write_atomic(staging / "calibration.json", json.dumps({"temperature": temperature}, indent=1))
        write_atomic(staging / "metrics.json", json.dumps(metrics, indent=1))
        write_atomic(staging / "wise_ft.json", json.dumps(summary, indent=1))
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
