"""The unknown flag: "this photo is not one of our classes", from the model's penultimate features.

Every exported model has a ``features`` output: the pooled, attended last feature map, what the
classifier's linear layer reads. The export fits two scores on the training images' features and ships
them in ``calibration.json`` under ``unknown`` (no torch needed to serve them):

* ``knn``: cosine similarity to the k-th nearest training photo, in the span of the training features'
  top ``d`` principal axes (``projection`` (D, d), uncentred; ``bank`` (M, d): the training photos,
  projected and L2-normalised, float16). Low for a photo unlike every training photo: the other
  cuisines' dishes, mostly.
* ``residual``: minus the share of the photo's feature vector outside that span. The training photos
  live almost entirely inside it; leaves, rooms and people do not (measured on south_asian_food: it
  flags 98 % of plant photos where the k-NN score alone flags 80 %).

A photo is unknown when either score is under its threshold. ``unknown_score`` (what the API returns) is
the smaller margin, ``min(knn - knn_threshold, residual - residual_threshold)``: below 0 is unknown.
The export chooses both thresholds on photos the model never trained on (:func:`choose_thresholds`).

Arrays travel as base64 of little-endian float16 with their shape; a package is untrusted, so
:func:`load_spec` checks every shape and size before a single array is decoded.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thali.core.errors import DataError

METHOD = "knn_residual"
MAX_BANK_VALUES = 8_000_000  # 16 MB of float16: a larger array is refused, not decoded
MAX_FEATURES = 16_384


def encode(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f2")
    encoded = base64.b64encode(data.tobytes()).decode()
    return {"shape": list(data.shape), "dtype": "float16", "base64": encoded}


def _decode(spec: Any, name: str, max_values: int) -> np.ndarray:
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
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= max_values for n in shape)
    ):
        raise DataError(f"{where}: shape must be 2 positive whole numbers")
    count = shape[0] * shape[1]
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


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class UnknownScore:
    """Fitted feature scores; ``scores(features)`` is the margin over the thresholds (< 0: unknown)."""

    projection: np.ndarray  # (D, d), orthonormal columns
    bank: np.ndarray  # (M, d), unit rows
    k: int
    knn_threshold: float = float("-inf")
    residual_threshold: float = float("-inf")

    @property
    def threshold(self) -> float:
        """On the margin :meth:`scores` returns: below it, unknown."""
        return 0.0

    @property
    def dims(self) -> int:
        return int(self.projection.shape[0])

    def components(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(knn, residual)`` per photo, each higher for photos more like the training photos."""
        x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
        if x.shape[1] != self.dims:
            raise DataError(
                f"the model's features have {x.shape[1]} values; the unknown score expects {self.dims}"
            )
        z = x @ self.projection
        outside = np.linalg.norm(x - z @ self.projection.T, axis=1)
        residual = -outside / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        sims = _unit(z) @ self.bank.T
        k = min(self.k, sims.shape[1])
        knn = np.partition(sims, -k, axis=1)[:, -k]
        return knn.astype(np.float32), residual.astype(np.float32)

    def scores(self, features: np.ndarray) -> np.ndarray:
        return self.margin(self.components(features))

    def margin(self, components: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """The margin over both thresholds of components already computed (:meth:`components`)."""
        knn, residual = components
        return np.minimum(knn - self.knn_threshold, residual - self.residual_threshold).astype(np.float32)

    def to_spec(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "k": self.k,
            "knn_threshold": float(self.knn_threshold),
            "residual_threshold": float(self.residual_threshold),
            "projection": encode(self.projection),
            "bank": encode(self.bank),
        }


def fit(
    features: np.ndarray, *, k: int = 5, dims: int = 128, max_bank: int = 4096, seed: int = 0
) -> UnknownScore:
    """Both scores on training ``features`` (N, D), thresholds still open (:func:`choose_thresholds`)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise DataError("the unknown score needs the features of at least two training images")
    d = max(1, min(dims, *x.shape))
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # principal axes of the raw features, largest first
    # rounded to float16 now, so the score measured at export is the score served
    projection = vt[:d].T.astype(np.float16).astype(np.float32)
    if len(x) > max_bank:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_bank, replace=False))]
    bank = _unit(x.astype(np.float32) @ projection).astype(np.float16).astype(np.float32)
    return UnknownScore(projection=projection, bank=bank, k=int(k))


def _cut(values: np.ndarray, count: int) -> float:
    """The highest threshold under which at most ``count`` of ``values`` fall (ties may let fewer)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    if not len(ordered):
        return 0.0
    return float(ordered[count]) if count < len(ordered) else float(ordered[-1] + 1e-6)


def choose_threshold(values: np.ndarray, max_flagged: float) -> float:
    """The highest threshold that flags at most ``max_flagged`` of ``values`` (scores of photos of our
    classes the model did not train on): no other threshold flags more out-of-domain photos within it."""
    return _cut(values, int(np.floor(max_flagged * len(values))))


def choose_thresholds(
    in_domain: tuple[np.ndarray, np.ndarray],
    max_flagged: float,
    outside: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    steps: int = 21,
) -> tuple[float, float]:
    """``(knn_threshold, residual_threshold)`` that together flag at most ``max_flagged`` of the
    ``in_domain`` photos (components of photos of our classes the model never trained on) and, among
    the ways to share that budget between the two scores, flag most of the ``outside`` photos (mean
    share over the sets; without any, the budget is shared equally)."""
    knn, residual = (np.asarray(v, dtype=np.float64) for v in in_domain)
    allowed = int(np.floor(max_flagged * len(knn)))
    best: tuple[float, float, float] | None = None
    shares = np.linspace(0, 1, steps) if outside else np.array([0.5])
    for share in shares:
        t_knn = _cut(knn, round(share * allowed))
        below = knn < t_knn
        # the largest residual threshold that keeps the union within the budget
        t_res = _cut(residual[~below], allowed - int(below.sum()))
        if not outside:
            return t_knn, t_res
        caught = np.mean([np.mean((k_ < t_knn) | (r_ < t_res)) for k_, r_ in outside])
        if best is None or caught > best[0]:
            best = (float(caught), t_knn, t_res)
    assert best is not None
    return best[1], best[2]


def load_spec(calibration: Mapping[str, Any]) -> UnknownScore | None:
    """The package's feature scores, or ``None`` when it ships none (the flag then falls back to the
    top probability under ``unknown_threshold``). A malformed spec is a :class:`DataError`."""
    spec = calibration.get("unknown")
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise DataError("calibration.json unknown: expected an object")
    method = spec.get("method")
    if method != METHOD:
        raise DataError(f"calibration.json unknown.method: {str(method)[:40]!r} is not one of: {METHOD}")
    k = spec.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1000:
        raise DataError("calibration.json unknown.k: expected a whole number from 1 to 1000")
    thresholds = []
    for name in ("knn_threshold", "residual_threshold"):
        value = spec.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
            raise DataError(f"calibration.json unknown.{name}: expected a finite number")
        thresholds.append(float(value))
    projection = _decode(spec.get("projection"), "projection", MAX_BANK_VALUES)
    bank = _decode(spec.get("bank"), "bank", MAX_BANK_VALUES)
    if projection.shape[0] > MAX_FEATURES or bank.shape[1] != projection.shape[1]:
        raise DataError(
            f"calibration.json unknown: shapes do not fit together (projection {list(projection.shape)}, "
            f"bank {list(bank.shape)})"
        )
    return UnknownScore(projection, bank, k, thresholds[0], thresholds[1])
