"""The unknown flag: "this photo is not one of our classes", from the model's penultimate features.

Every exported model has a ``features`` output: the pooled, attended last feature map, what the
classifier's linear layer reads. The export fits a k-nearest-neighbour score on the training images'
features and ships it in ``calibration.json`` under ``unknown`` (no torch needed to serve it):

* ``mean`` (D,): the training features' mean; ``projection`` (D, d): their top-``d`` principal axes, so
  the bank is small enough to ship (d = 128 keeps the package a few hundred KB larger);
* ``bank`` (M, d): the training images' centred, projected, L2-normalised features (float16);
* ``k``: the score of a photo is its cosine similarity to its k-th nearest training image (higher =
  more like something we trained on);
* ``threshold``: below it, the answer is flagged unknown. The export picks it on photos the model never
  saw in training: validation photos of held-out collections (``val_cross``) when the split has them,
  so that at most ``export.unknown.max_in_domain_flagged`` of those are flagged.

Arrays travel as base64 of little-endian float16 with their shape; a package is untrusted, so
:func:`load_spec` checks every shape and size before a single array is decoded.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from thali.core.errors import DataError

METHODS = ("knn_cosine", "max_probability")
MAX_BANK_VALUES = 8_000_000  # 16 MB of float16: a bank larger than that is refused, not decoded
MAX_FEATURES = 16_384


def encode(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f2")
    encoded = base64.b64encode(data.tobytes()).decode()
    return {"shape": list(data.shape), "dtype": "float16", "base64": encoded}


def _decode(spec: Any, name: str, ndim: int, max_values: int) -> np.ndarray:
    where = f"calibration.json unknown.{name}"
    if (
        not isinstance(spec, Mapping)
        or spec.get("dtype") != "float16"
        or not isinstance(spec.get("base64"), str)
    ):
        raise DataError(f"{where}: expected {{shape, dtype: float16, base64}}")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= max_values for n in shape)
    ):
        raise DataError(f"{where}: shape must be {ndim} positive whole numbers")
    count = int(np.prod(shape))
    if count > max_values or len(spec["base64"]) != 4 * ((2 * count + 2) // 3):
        raise DataError(f"{where}: {spec['shape']} does not match the size of its data")
    try:
        raw = base64.b64decode(spec["base64"], validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: not valid base64") from None
    values = np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{where}: holds values that are not finite")
    return values


@dataclass(frozen=True)
class UnknownScore:
    """A fitted k-NN score; ``scores(features)`` is higher for photos more like the training images."""

    mean: np.ndarray
    projection: np.ndarray
    bank: np.ndarray
    k: int
    threshold: float

    @property
    def dims(self) -> int:
        return int(self.mean.shape[0])

    def scores(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
        if x.shape[1] != self.dims:
            raise DataError(
                f"the model's features have {x.shape[1]} values; the unknown score expects {self.dims}"
            )
        z = (x - self.mean) @ self.projection
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        sims = z @ self.bank.T
        k = min(self.k, sims.shape[1])
        return np.partition(sims, -k, axis=1)[:, -k].astype(np.float32)

    def to_spec(self) -> dict[str, Any]:
        return {
            "method": "knn_cosine",
            "k": self.k,
            "threshold": float(self.threshold),
            "mean": encode(self.mean),
            "projection": encode(self.projection),
            "bank": encode(self.bank),
        }


def fit(
    features: np.ndarray, *, k: int = 5, dims: int = 128, max_bank: int = 4096, seed: int = 0
) -> UnknownScore:
    """A k-NN score on training ``features`` (N, D); the threshold is set later (:func:`choose_threshold`)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise DataError("the unknown score needs the features of at least two training images")
    mean = x.mean(0)
    centred = x - mean
    d = max(1, min(dims, *centred.shape))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # principal axes, largest first
    projection = vt[:d].T
    if len(x) > max_bank:  # a spread subsample keeps every class (rows arrive grouped by image order)
        keep = np.random.default_rng(seed).choice(len(x), max_bank, replace=False)
        centred = centred[np.sort(keep)]
    z = centred @ projection
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    # round through float16 now, so the score measured at export is the score served
    f16 = np.float32
    return UnknownScore(
        mean=mean.astype(np.float16).astype(f16),
        projection=projection.astype(np.float16).astype(f16),
        bank=z.astype(np.float16).astype(f16),
        k=int(k),
        threshold=float("-inf"),
    )


def choose_threshold(in_domain: np.ndarray, max_flagged: float) -> float:
    """The highest threshold that flags at most ``max_flagged`` of ``in_domain`` scores (photos of our
    classes the model did not train on): every higher-scoring out-of-domain photo is then let through, so
    no other threshold flags more out-of-domain photos under that limit."""
    values = np.sort(np.asarray(in_domain, dtype=np.float64))
    allowed = int(np.floor(max_flagged * len(values)))  # this many may fall below the threshold
    return float(values[allowed]) if allowed < len(values) else float(values[-1] + 1e-6)


def load_spec(calibration: Mapping[str, Any]) -> UnknownScore | None:
    """The package's k-NN unknown score, or ``None`` when it ships none (the flag then falls back to the
    top probability under ``unknown_threshold``). A malformed spec is a :class:`DataError`."""
    spec = calibration.get("unknown")
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise DataError("calibration.json unknown: expected an object")
    method = spec.get("method")
    if method != "knn_cosine":
        raise DataError(f"calibration.json unknown.method: {str(method)[:40]!r} is not one of: knn_cosine")
    k, threshold = spec.get("k"), spec.get("threshold")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1000:
        raise DataError("calibration.json unknown.k: expected a whole number from 1 to 1000")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not np.isfinite(threshold):
        raise DataError("calibration.json unknown.threshold: expected a finite number")
    mean = _decode(spec.get("mean"), "mean", 1, MAX_FEATURES)
    projection = _decode(spec.get("projection"), "projection", 2, MAX_BANK_VALUES)
    bank = _decode(spec.get("bank"), "bank", 2, MAX_BANK_VALUES)
    if projection.shape[0] != mean.shape[0] or bank.shape[1] != projection.shape[1]:
        raise DataError(
            f"calibration.json unknown: shapes do not fit together (mean {list(mean.shape)}, projection "
            f"{list(projection.shape)}, bank {list(bank.shape)})"
        )
    return UnknownScore(mean, projection, bank, k, float(threshold))
