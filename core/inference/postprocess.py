"""From logits to answers: temperature-scaled probabilities, top-k with display names, the unknown
flag (the package's feature scores under their thresholds, see :mod:`.unknown`; for a package without
them, the top probability under ``unknown_threshold``), and class-activation heatmaps."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .unknown import METHOD, UnknownScore


def softmax(logits: np.ndarray, temperature: float = 1.0, dtype: Any = np.float32) -> np.ndarray:
    """Temperature-scaled probabilities over the last axis, computed in float64 and returned as
    ``dtype`` (float32 for answers; training's metrics keep float64): the one softmax of thali."""
    z = np.asarray(logits, dtype=np.float64) / max(float(temperature), 1e-6)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(dtype, copy=False)


@dataclass
class Prediction:
    """One image's answer: top-k classes with calibrated probabilities and the unknown flag."""

    top: list[dict[str, Any]]
    unknown: bool
    threshold: float | None
    score: float | None = None
    method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictions": self.top,
            "unknown": self.unknown,
            "unknown_threshold": self.threshold,
            "unknown_score": self.score,
            "unknown_method": self.method,
        }


def predictions(
    logits: np.ndarray,
    classes: Sequence[Mapping[str, Any]],
    calibration: Mapping[str, Any],
    top_k: int = 5,
    *,
    features: np.ndarray | None = None,
    stage_features: np.ndarray | None = None,
    unknown_score: UnknownScore | None = None,
) -> list[Prediction]:
    """A :class:`Prediction` per row of ``logits`` (N, K). With ``unknown_score`` (the package's, see
    :func:`.unknown.load_spec`) and the model's ``features`` (N, D) (and ``stage_features`` for a score
    with layers), the unknown flag is that score under its threshold; otherwise the top probability
    under ``calibration["unknown_threshold"]``."""
    temperature = float(calibration.get("temperature") or 1.0)
    probs = softmax(np.atleast_2d(logits), temperature)
    threshold: float | None
    if unknown_score is not None and features is not None:
        method, threshold = METHOD, unknown_score.threshold
        values = unknown_score.scores(features, stage_features)
    else:
        method, threshold = "max_probability", calibration.get("unknown_threshold")
        values = probs.max(axis=1)
    k = max(1, min(int(top_k), probs.shape[1]))
    out = []
    for row, value in zip(probs, values, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        top = [
            {
                "label": str(classes[i].get("name", i)),
                "display_name": str(classes[i].get("display_name") or classes[i].get("name", i)),
                "class_id": int(i),
                "probability": round(float(row[i]), 6),
            }
            for i in order
        ]
        unknown = threshold is not None and float(value) < float(threshold)
        out.append(
            Prediction(
                top,
                bool(unknown),
                None if threshold is None else float(threshold),
                round(float(value), 6),
                method if threshold is not None else None,
            )
        )
    return out


def heatmap_png(cam: np.ndarray, crop: np.ndarray, alpha: float = 0.45) -> str:
    """The class-activation map ``cam`` (h, w) of one class, upsampled onto the model's RGB ``crop``
    (H, W, 3) as a JET overlay; a base64 PNG."""
    import cv2

    cam = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    cam = cam / cam.max() if cam.max() > 0 else cam
    h, w = crop.shape[:2]
    heat = cv2.resize(cam, (w, h), interpolation=cv2.INTER_CUBIC)
    colour = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    overlay = (alpha * colour + (1 - alpha) * crop).astype(np.uint8)
    ok, png = cv2.imencode(".png", overlay[:, :, ::-1])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise RuntimeError("could not encode the heatmap")
    return base64.b64encode(png.tobytes()).decode()
