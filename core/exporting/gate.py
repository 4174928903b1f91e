"""The accuracy gate: every variant is scored on the validation split in ONNX Runtime and compared with
the fp32 model. It fails when top-1 drops more than ``max_top1_drop`` points, or when any class drops
more than ``max_class_drop`` points *and* loses more than ``class_noise_images`` images (net): on a
class of 7 validation images one flipped image is 14 points, which says nothing about the variant."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.config import GateConfig


def run_onnx(
    path: Path, images: np.ndarray, batch_size: int = 32, providers: Sequence[str] = ()
) -> np.ndarray:
    """Logits of an ONNX model over ``images`` (CPU unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers) or ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def gate(candidate: dict[str, Any], reference: dict[str, Any], thresholds: GateConfig) -> dict[str, Any]:
    """Compare a variant's scores with the fp32 scores (both from ``metrics.summarize``: ``top1`` and
    ``per_class`` recall = class accuracy, with support); ``passed`` and, when it fails, ``reasons``."""
    max_top1, max_class = thresholds.max_top1_drop, thresholds.max_class_drop
    noise = thresholds.class_noise_images
    top1_drop = 100.0 * (reference["top1"] - candidate["top1"])
    reasons: list[str] = []
    if top1_drop > max_top1 + 1e-9:
        reasons.append(
            f"top-1 {100 * candidate['top1']:.2f}% is {top1_drop:.2f} points below fp32 "
            f"{100 * reference['top1']:.2f}% (allowed: {max_top1:g})"
        )
    worst: dict[str, Any] = {"class": None, "drop": 0.0, "lost": 0}
    for name, ref in reference["per_class"].items():
        support = ref["support"]
        if not support or name not in candidate["per_class"]:
            continue
        got = candidate["per_class"][name]["recall"]
        drop = 100.0 * (ref["recall"] - got)
        lost = round(ref["recall"] * support) - round(got * support)
        if drop > worst["drop"]:
            worst = {"class": name, "drop": round(drop, 2), "lost": lost}
        if drop > max_class + 1e-9 and lost > noise:
            reasons.append(
                f"class {name!r} drops {drop:.1f} points ({lost} of {support} images lost; "
                f"allowed: {max_class:g} points or {noise} image(s))"
            )
    return {
        "passed": not reasons,
        "top1_drop": round(top1_drop, 3),
        "worst_class": worst,
        "thresholds": {"max_top1_drop": max_top1, "max_class_drop": max_class, "class_noise_images": noise},
        "reasons": reasons,
    }
