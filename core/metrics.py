"""Classification metrics and probability calibration, numpy only (shared by training, export gates
and evaluation; the softmax is serving's): top-k, per-class precision/recall, confusion matrix, ECE,
temperature scaling."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from thali.core.inference.postprocess import softmax as _softmax

#: the serving softmax, in float64 for NLL and ECE (training may import inference, never the reverse)
softmax = functools.partial(_softmax, dtype=np.float64)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1))) if len(labels) else 0.0


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def per_class_report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    for i, name in enumerate(classes):
        tp, support, predicted = cm[i, i], cm[i].sum(), cm[:, i].sum()
        out[name] = {
            "precision": float(tp / predicted) if predicted else 0.0,
            "recall": float(tp / support) if support else 0.0,
            "support": int(support),
        }
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins."""
    if not len(labels):
        return 0.0
    return _binned_ece(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


def _binned_ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def ece_noise_floor(
    probs: np.ndarray, bins: int = 15, draws: int = 500, seed: int = 0
) -> tuple[float, float]:
    """The ECE a *perfectly calibrated* model with these confidences would read on this many photos:
    (median, 90th percentile) over ``draws`` simulated outcomes, each prediction correct with probability
    its confidence. On a few hundred photos this floor is several hundredths, so a smaller measured ECE
    target cannot be told apart from sampling noise there."""
    confidence = probs.max(axis=1)
    if not len(confidence):
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    values = [_binned_ece(confidence, rng.random(len(confidence)) < confidence, bins) for _ in range(draws)]
    return float(np.median(values)), float(np.percentile(values, 90))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def _succession_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """NLL against targets that keep 1 / (n + 2) for the other classes (Laplace's rule of succession):
    n validation photos, even all answered right, never show that the error rate is zero."""
    n, k = logits.shape
    if k < 2:
        return nll(logits, labels, temperature)
    log_p = np.log(np.clip(softmax(logits, temperature), 1e-12, None))
    eps = 1.0 / (n + 2)
    right = log_p[np.arange(n), labels]
    others = (log_p.sum(axis=1) - right) / (k - 1)
    return float(-np.mean((1.0 - eps) * right + eps * others))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The temperature minimising validation NLL (golden-section search over log T), with targets that
    leave 1 / (n + 2) to the other classes: on a validation split the model gets entirely right, plain
    NLL falls for ever as T shrinks and every answer would read 100 % sure; this stops near the
    (n + 1) / (n + 2) confidence n right answers support, and moves a large split's T by a hair."""
    if not len(labels):
        return 1.0
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _succession_nll(logits, labels, math.exp(c)), _succession_nll(logits, labels, math.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _succession_nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _succession_nll(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


def summarize(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], temperature: float = 1.0
) -> dict[str, Any]:
    """Everything ``metrics.json`` and ``thali evaluate`` report for one set of logits."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    cm = confusion_matrix(logits.argmax(axis=1), labels, len(classes))
    probs = softmax(logits, temperature)
    return {
        "images": len(labels),
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "nll": nll(logits, labels, temperature),
        "ece": expected_calibration_error(probs, labels),
        "temperature": float(temperature),
        "per_class": per_class_report(cm, classes),
        "confusion_matrix": cm.tolist(),
    }


def calibrated_summary(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], chooses: np.ndarray
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A temperature fitted on the rows that may choose (``chooses``), then every row summarised with
    it: ``(summary, calibration)``, the ``val`` and ``calibration`` entries of ``metrics.json``."""
    temperature = fit_temperature(logits[chooses], labels[chooses])
    raw = summarize(logits, labels, classes)
    calibrated = summarize(logits, labels, classes, temperature)
    calibration = {
        "temperature": temperature,
        "fitted_on_images": int(np.count_nonzero(chooses)),  # without a split's held-out collections
        "ece_before": raw["ece"],
        "ece_after": calibrated["ece"],
        "nll_before": raw["nll"],
        "nll_after": calibrated["nll"],
    }
    return calibrated, calibration


def confusion_image(cm: np.ndarray, classes: Sequence[str], cell: int = 22) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB image (HWC uint8) with class names."""
    from PIL import Image, ImageDraw

    n = len(classes)
    margin = 8 + 6 * max((len(c) for c in classes), default=1)
    top = max(margin, 48)  # room for the legend and the column indices
    img = Image.new("RGB", (max(margin + n * cell + 4, 340), top + n * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    rows = cm.sum(axis=1, keepdims=True).clip(min=1)
    norm = cm / rows
    for i in range(n):
        draw.text((2, top + i * cell + cell // 3), classes[i][: margin // 6], fill="black")
        for j in range(n):
            v = float(norm[i, j])
            shade = int(255 * (1 - v))
            x0, y0 = margin + j * cell, top + i * cell
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(230, 230, 230))
            if cm[i, j]:
                draw.text((x0 + 3, y0 + cell // 3), str(int(cm[i, j])), fill="black" if v < 0.6 else "white")
    for j in range(n):  # column labels: class index
        draw.text((margin + j * cell + 5, top - 14), str(j), fill="black")
    draw.text((2, 2), "rows: true class; columns: predicted class (index)", fill="black")
    draw.text((2, 16), "blue: correct, red: confused (shade = share of the row)", fill="black")
    return np.asarray(img)
