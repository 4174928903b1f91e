"""WiSE-FT (Wortsman et al., CVPR 2022): the weights of two runs of one model, interpolated.

``weights(alpha) = (1 - alpha) * probe + alpha * tuned``: ``probe`` is a run that trained the head
alone on frozen features (a linear probe), ``tuned`` one that fine-tuned more of the network (ideally
from that probe's head: LP-FT). The mix keeps much of the probe's robustness on photos unlike the
training ones and much of the fine-tuned accuracy. :func:`wise_ft` writes it as a run folder that
``thali evaluate`` and ``thali export`` take like any other: ``config.yaml`` and ``split.json`` of the
tuned run, ``best.pt`` with the mixed weights, and ``calibration.json`` with a temperature fitted again
for them. ``alpha`` is given, or chosen from a grid by top-1 on the validation photos of the *training*
collections (a cross-collection split's held-out photos never take part in the choice).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
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


def _choosing_samples(run_dir: Path, data: Path | None) -> list[tuple[Path, int]]:
    """The validation photos of the training collections: the whole validation split, less the
    held-out collections' photos of a cross-collection split."""
    from .data import read_split

    split = read_split(run_dir / "split.json", data)
    cross = set(split.val_cross)
    return [sample for i, sample in enumerate(split.val) if i not in cross]


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
    from .data import ImageDataset, make_loader
    from .evaluate import load_run
    from .metrics import fit_temperature
    from .transforms import eval_transform

    probe_run, tuned_run, out = Path(probe_run), Path(tuned_run), Path(out)
    if out.exists():
        raise DataError(f"wise-ft: {out} exists; choose a new folder")
    probe = ckpt.load(probe_run / "best.pt")["model"]
    run = load_run(tuned_run, registries)
    tuned = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    interpolate(probe, tuned, 0.0)  # the same model, or one line saying where they differ
    samples = _choosing_samples(tuned_run, data)
    if not samples:
        raise DataError(f"{tuned_run}: no validation photos of the training collections to choose on")
    limits = run.config.dataset.image_limits()
    loader = make_loader(
        ImageDataset(samples, eval_transform(run.model.preprocess), limits=limits),
        32,
        shuffle=False,
        seed=0,
        num_workers=0,
    )

    def logits_at(a: float) -> tuple[np.ndarray, np.ndarray]:
        ckpt.load_weights(run.model, interpolate(probe, tuned, a), probe_run / "best.pt")
        run.model.eval()
        outs, labels = [], []
        with torch.no_grad():
            for batch in loader:
                if batch["images"] is not None:
                    outs.append(run.model(batch["images"]))
                    labels.append(batch["labels"])
        if not outs:
            raise DataError(f"{tuned_run}: none of the validation photos could be read")
        return torch.cat(outs).numpy(), torch.cat(labels).numpy()

    grid = [float(alpha)] if alpha is not None else sorted({float(a) for a in alphas})
    scored: dict[str, float] = {}
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for a in grid:
        logits, labels = logits_at(a)
        top1 = float((logits.argmax(1) == labels).mean())
        scored[f"{a:g}"] = top1
        # a tie goes to the mix nearer the middle: both endpoints' strengths, as the paper recommends
        if best is None or (top1, -abs(a - 0.5)) > (best[0], -abs(best[1] - 0.5)):
            best = (top1, a, logits, labels)
    assert best is not None
    top1, chosen, logits, labels = best
    temperature = fit_temperature(logits, labels)
    out.mkdir(parents=True)
    for name in ("config.yaml", "split.json"):
        shutil.copy2(tuned_run / name, out / name)
    mixed = interpolate(probe, tuned, chosen)
    record = {
        "probe_run": str(probe_run),
        "tuned_run": str(tuned_run),
        "alpha": chosen,
        "top1_by_alpha": scored,
        "chosen_on": f"{len(labels)} validation photos of the training collections",
    }
    ckpt.save_atomic({"model": mixed, "wise_ft": record}, out / "best.pt")
    write_atomic(out / "calibration.json", json.dumps({"temperature": temperature}, indent=1))
    summary = {**record, "top1": top1, "temperature": temperature}
    write_atomic(out / "wise_ft.json", json.dumps(summary, indent=1))
    return summary
