"""The unknown flag: "this photo is not one of our classes", from the model's penultimate features.

Every exported model has a ``features`` output: the pooled, attended last feature map, what the
classifier's linear layer reads. The export fits two scores on the training images' features and ships
them in ``calibration.json`` under ``unknown`` (no torch needed to serve them):

* ``knn``: cosine similarity to the k-th nearest training photo, in the span of the training features'
  top ``d`` principal axes (``projection`` (D, d), uncentred; ``bank`` (M, d): the training photos,
  projected and L2-normalised, int8 rows). Low for a photo unlike every training photo: the other
  cuisines' dishes, mostly.
* ``residual``: minus the share of the photo's feature vector outside that span. The training photos
  live almost entirely inside it; leaves, rooms and people do not (measured on south_asian_food: it
  flags 98 % of plant photos where the k-NN score alone flags 80 %).

With ``layers`` (by default for a backbone with four stages or more), the k-NN score also reads the
pooled outputs of earlier stages, the two before the last unless ``export.unknown.stages`` names others
(the model's ``stage_features`` output, the stages' outputs average-pooled and concatenated): each group
has its own projection and bank, its similarity is standardised by the mean and spread of the training
photos' own k-th-neighbour similarities (leave one out), and ``knn`` is the weighted mean of the
standardised similarities put back on the scale of the last features' (``mean + std * z``; 1 for the
last features, each earlier stage its ``weight``: 0.5, or what the export chose on out-of-domain photos
among :data:`LAYER_WEIGHTS`, ``export.unknown.layer_weight``). Earlier
stages see textures and shapes that the last one, trained to tell our classes apart, has learned to
ignore: a pizza's crust is not a naan. Measured on south_asian_food's held-out collections (4.7 % of
them flagged): 62.0 % -> 73.5 % of other cuisines' dishes flagged.

A photo is unknown when either score is under its threshold. ``unknown_score`` (what the API returns) is
the smaller margin, ``min(knn - knn_threshold, residual - residual_threshold)``: below 0 is unknown.
The export chooses both thresholds on photos the model never trained on (:func:`choose_thresholds`).

Arrays travel as base64 with their shape: projections as little-endian float16, banks as int8 with a
float16 scale per row (half the bytes; a package must fit the bundled registry's budget). A package
is untrusted, so :func:`load_spec` checks every shape and size before a single array is decoded.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thali.core.errors import DataError

METHOD = "knn_residual"
MAX_BANK_VALUES = 8_000_000  # 16 MB of float16: a larger array is refused, not decoded
MAX_TOTAL_VALUES = 2 * MAX_BANK_VALUES  # every array of one spec together, layers included
MAX_FEATURES = 16_384
MAX_LAYERS = 8
LAYER_WEIGHT = 0.5  # an earlier stage's share of the k-NN score, next to 1 for the last features
# the shares an export with out-of-domain photos tries (export.unknown.layer_weight: auto)
LAYER_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _b64(data: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(data).tobytes()).decode()


def encode(array: np.ndarray) -> dict[str, Any]:
    """A (R, C) array as base64 of little-endian float16."""
    data = np.asarray(array, dtype="<f2")
    return {"shape": list(data.shape), "dtype": "float16", "base64": _b64(data)}


def _int8_rows(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 values, float16 scale per row)`` of a (R, C) array: each row's largest value is 127."""
    x = np.asarray(array, dtype=np.float32)
    scales = (np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-8) / 127).astype("<f2")
    return np.clip(np.rint(x / scales.astype(np.float32)), -127, 127).astype(np.int8), scales


def encode_rows_int8(array: np.ndarray) -> dict[str, Any]:
    """A (R, C) array of unit rows as int8 with one float16 scale per row: half the bytes of float16,
    cosine similarities within about 0.002 of the float16 ones. What a bank ships as."""
    q, scales = _int8_rows(array)
    return {"shape": list(q.shape), "dtype": "int8", "base64": _b64(q), "scales": _b64(scales)}


def quantise_rows(array: np.ndarray) -> np.ndarray:
    """What :func:`encode_rows_int8` gives back (the same arithmetic as :func:`_decode`): the score
    measured at export is the score served."""
    q, scales = _int8_rows(array)
    return q.astype(np.float32) * scales.astype(np.float32)


def _b64_length(count: int) -> int:
    return 4 * ((count + 2) // 3)


def _decode(spec: Any, name: str, max_values: int) -> np.ndarray:
    where = f"calibration.json unknown.{name}"
    dtype = spec.get("dtype") if isinstance(spec, Mapping) else None
    if dtype not in ("float16", "int8") or not isinstance(spec.get("base64"), str):
        raise DataError(f"{where}: expected {{shape, dtype: float16 or int8, base64}}")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= max_values for n in shape)
    ):
        raise DataError(f"{where}: shape must be 2 positive whole numbers")
    count = shape[0] * shape[1]
    width = 2 if dtype == "float16" else 1
    if count > max_values or len(spec["base64"]) != _b64_length(width * count):
        raise DataError(f"{where}: {spec['shape']} does not match the size of its data")
    if dtype == "int8" and (
        not isinstance(spec.get("scales"), str) or len(spec["scales"]) != _b64_length(2 * shape[0])
    ):
        raise DataError(f"{where}: an int8 array needs one float16 scale per row (scales)")
    try:
        raw = base64.b64decode(spec["base64"], validate=True)
        scales = base64.b64decode(spec["scales"], validate=True) if dtype == "int8" else b""
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: not valid base64") from None
    if dtype == "float16":
        values = np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    else:
        rows = np.frombuffer(scales, dtype="<f2").astype(np.float32).reshape(shape[0], 1)
        values = np.frombuffer(raw, dtype=np.int8).reshape(shape).astype(np.float32) * rows
    if not np.isfinite(values).all():
        raise DataError(f"{where}: holds values that are not finite")
    return values


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _knn(z: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Cosine similarity of each projected row ``z`` to its k-th nearest bank row."""
    sims = _unit(z) @ bank.T
    k = min(k, sims.shape[1])
    return np.partition(sims, -k, axis=1)[:, -k]


def _loo_stats(bank: np.ndarray, k: int, chunk: int = 512) -> tuple[float, float]:
    """Mean and spread of the bank photos' own k-th-neighbour similarities (each without itself), a
    block of rows at a time (a bank of 50,000 photos would need 10 GB at once)."""
    k = min(k, len(bank) - 1)
    values = []
    for start in range(0, len(bank), chunk):
        sims = bank[start : start + chunk] @ bank.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf
        values.append(np.partition(sims, -k, axis=1)[:, -k])
    joined = np.concatenate(values)
    return float(joined.mean()), float(max(joined.std(), 1e-6))


@dataclass(frozen=True)
class Layer:
    """The k-NN score of one earlier stage: columns ``[start, stop)`` of ``stage_features``."""

    stage: int  # the backbone stage whose pooled output these columns are
    start: int
    projection: np.ndarray  # (C, d)
    bank: np.ndarray  # (M, d), the same training photos as the last features' bank
    mean: float
    std: float
    weight: float = LAYER_WEIGHT

    @property
    def stop(self) -> int:
        return self.start + int(self.projection.shape[0])


@dataclass(frozen=True)
class UnknownScore:
    """Fitted feature scores; ``scores(features, stage_features)`` is the margin over the thresholds
    (< 0: unknown). ``stage_features`` is needed only when the score has ``layers``."""

    projection: np.ndarray  # (D, d), orthonormal columns
    bank: np.ndarray  # (M, d), unit rows
    k: int
    knn_threshold: float = float("-inf")
    residual_threshold: float = float("-inf")
    mean: float = 0.0  # of the training photos' own k-NN similarity (leave one out); used with layers
    std: float = 1.0
    layers: tuple[Layer, ...] = ()

    @property
    def threshold(self) -> float:
        """On the margin :meth:`scores` returns: below it, unknown."""
        return 0.0

    @property
    def dims(self) -> int:
        return int(self.projection.shape[0])

    @property
    def stage_dims(self) -> int:
        """Values of ``stage_features`` the layers read (0 without layers)."""
        return max((layer.stop for layer in self.layers), default=0)

    def components(
        self, features: np.ndarray, stage_features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(knn, residual)`` per photo, each higher for photos more like the training photos."""
        x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
        if x.shape[1] != self.dims:
            raise DataError(
                f"the model's features have {x.shape[1]} values; the unknown score expects {self.dims}"
            )
        z = x @ self.projection
        outside = np.linalg.norm(x - z @ self.projection.T, axis=1)
        residual = -outside / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        knn = _knn(z, self.bank, self.k)
        if self.layers:
            if stage_features is None:
                raise DataError("the unknown score reads stage_features; the model gives none")
            s = np.asarray(stage_features, dtype=np.float32).reshape(len(x), -1)
            if s.shape[1] != self.stage_dims:
                raise DataError(
                    f"the model's stage_features have {s.shape[1]} values; the unknown score expects "
                    f"{self.stage_dims}"
                )
            total = 1.0
            standard = (knn - self.mean) / self.std
            for layer in self.layers:
                sims = _knn(s[:, layer.start : layer.stop] @ layer.projection, layer.bank, self.k)
                standard = standard + layer.weight * (sims - layer.mean) / layer.std
                total += layer.weight
            knn = self.mean + self.std * standard / total
        return knn.astype(np.float32), residual.astype(np.float32)

    def with_layer_weight(self, weight: float) -> UnknownScore:
        """The same score with every earlier stage weighing ``weight`` next to 1 for the last features."""
        return dataclasses.replace(
            self, layers=tuple(dataclasses.replace(layer, weight=float(weight)) for layer in self.layers)
        )

    def scores(self, features: np.ndarray, stage_features: np.ndarray | None = None) -> np.ndarray:
        return self.margin(self.components(features, stage_features))

    def margin(self, components: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """The margin over both thresholds of components already computed (:meth:`components`)."""
        knn, residual = components
        return np.minimum(knn - self.knn_threshold, residual - self.residual_threshold).astype(np.float32)

    def to_spec(self) -> dict[str, Any]:
        spec = {
            "method": METHOD,
            "k": self.k,
            "knn_threshold": float(self.knn_threshold),
            "residual_threshold": float(self.residual_threshold),
            "projection": encode(self.projection),
            "bank": encode_rows_int8(self.bank),
        }
        if self.layers:
            spec.update(mean=self.mean, std=self.std)
            spec["layers"] = [
                {
                    "stage": layer.stage,
                    "start": layer.start,
                    "mean": layer.mean,
                    "std": layer.std,
                    "weight": layer.weight,
                    "projection": encode(layer.projection),
                    "bank": encode_rows_int8(layer.bank),
                }
                for layer in self.layers
            ]
        return spec


def _space(x: np.ndarray, dims: int, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(projection, bank)`` of training features ``x``: the top ``dims`` principal axes (uncentred,
    rounded to float16) and the kept photos projected and normalised (rounded to int8 rows): rounded
    now, as they ship, so the score measured at export is the score served."""
    d = max(1, min(dims, *x.shape))
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # principal axes of the raw features, largest first
    projection = vt[:d].T.astype(np.float16).astype(np.float32)
    kept = x if keep is None else x[keep]
    return projection, quantise_rows(_unit(kept.astype(np.float32) @ projection))


def fit(
    features: np.ndarray,
    *,
    k: int = 5,
    dims: int = 128,
    max_bank: int = 4096,
    seed: int = 0,
    stage_features: np.ndarray | None = None,
    stages: Sequence[Sequence[int]] = (),
) -> UnknownScore:
    """Both scores on training ``features`` (N, D), thresholds still open (:func:`choose_thresholds`).
    With ``stage_features`` (N, S) and ``stages`` (``(stage index, width)`` per group of its columns, in
    order), the k-NN score also reads those groups (:class:`Layer`)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise DataError("the unknown score needs the features of at least two training images")
    keep = None
    if len(x) > max_bank:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_bank, replace=False))
    projection, bank = _space(x, dims, keep)
    if stage_features is None or not stages:
        return UnknownScore(projection=projection, bank=bank, k=int(k))
    s = np.asarray(stage_features, dtype=np.float64).reshape(len(x), -1)
    if s.shape[1] != sum(width for _, width in stages):
        raise DataError(f"stage_features have {s.shape[1]} values; the stages' widths {list(stages)} differ")
    layers, start = [], 0
    for stage, width in stages:
        p, b = _space(s[:, start : start + width], dims, keep)
        layers.append(Layer(int(stage), start, p, b, *_loo_stats(b, k)))
        start += width
    mean, std = _loo_stats(bank, k)
    return UnknownScore(projection=projection, bank=bank, k=int(k), mean=mean, std=std, layers=tuple(layers))


def _cut(values: np.ndarray, count: int) -> float:
    """The highest threshold under which at most ``count`` of ``values`` fall (ties may let fewer)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    if not len(ordered):
        return 0.0
    return float(ordered[count]) if count < len(ordered) else float(ordered[-1] + 1e-6)


def _parts(count: int, groups: Sequence[Any] | np.ndarray | None) -> list[np.ndarray]:
    """Row masks of each group (one for all rows without groups)."""
    if groups is None:
        return [np.ones(count, dtype=bool)]
    labels = np.asarray(groups)
    if len(labels) != count:
        raise ValueError(f"{len(labels)} group labels for {count} photos")
    return [labels == g for g in sorted(set(labels.tolist()), key=str)]


def choose_threshold(
    values: np.ndarray, max_flagged: float, groups: Sequence[Any] | np.ndarray | None = None
) -> float:
    """The highest threshold that flags at most ``max_flagged`` of ``values`` (scores of photos of our
    classes the model did not train on): no other threshold flags more out-of-domain photos within it.
    With ``groups`` (the photo collection of each value) the budget holds in *every* group: the lowest
    of the groups' thresholds."""
    values = np.asarray(values)
    return min(_cut(values[m], int(np.floor(max_flagged * m.sum()))) for m in _parts(len(values), groups))


def choose_thresholds(
    in_domain: tuple[np.ndarray, np.ndarray],
    max_flagged: float,
    outside: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    steps: int = 21,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> tuple[float, float]:
    """``(knn_threshold, residual_threshold)`` that together flag at most ``max_flagged`` of the
    ``in_domain`` photos (components of photos of our classes the model never trained on) and, among
    the ways to share that budget between the two scores, flag most of the ``outside`` photos (mean
    share over the sets; without any, the budget is shared equally). With ``groups`` (the collection of
    each in-domain photo) the budget holds in every collection, not only over all of them: each
    threshold is the lowest the collections allow (lowering a threshold never flags more)."""
    knn, residual = (np.asarray(v, dtype=np.float64) for v in in_domain)
    parts = _parts(len(knn), groups)
    allowed = [int(np.floor(max_flagged * m.sum())) for m in parts]
    best: tuple[float, float, float] | None = None
    shares = np.linspace(0, 1, steps) if outside else np.array([0.5])
    for share in shares:
        t_knn = min(_cut(knn[m], round(share * a)) for m, a in zip(parts, allowed, strict=True))
        below = knn < t_knn
        # the largest residual threshold that keeps the union within every budget
        t_res = min(
            _cut(residual[m & ~below], a - int((below & m).sum()))
            for m, a in zip(parts, allowed, strict=True)
        )
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
    thresholds = [_number(spec, name) for name in ("knn_threshold", "residual_threshold")]
    projection = _decode(spec.get("projection"), "projection", MAX_BANK_VALUES)
    bank = _decode(spec.get("bank"), "bank", MAX_BANK_VALUES)
    if projection.shape[0] > MAX_FEATURES or bank.shape[1] != projection.shape[1]:
        raise DataError(
            f"calibration.json unknown: shapes do not fit together (projection {list(projection.shape)}, "
            f"bank {list(bank.shape)})"
        )
    layers_spec = spec.get("layers")
    if layers_spec is None:
        return UnknownScore(projection, bank, k, thresholds[0], thresholds[1])
    if not isinstance(layers_spec, list) or not 1 <= len(layers_spec) <= MAX_LAYERS:
        raise DataError(f"calibration.json unknown.layers: expected a list of 1 to {MAX_LAYERS} layers")
    layers: list[Layer] = []
    total = projection.size + bank.size
    for i, item in enumerate(layers_spec):
        where = f"layers[{i}]"
        if not isinstance(item, Mapping):
            raise DataError(f"calibration.json unknown.{where}: expected an object")
        stage, start = item.get("stage"), item.get("start")
        expected_start = layers[-1].stop if layers else 0
        if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < 1000:
            raise DataError(f"calibration.json unknown.{where}.stage: expected a stage index")
        if not isinstance(start, int) or isinstance(start, bool) or start != expected_start:
            raise DataError(f"calibration.json unknown.{where}.start: expected {expected_start}")
        total += _claimed(item.get("projection")) + _claimed(item.get("bank"))
        if total > MAX_TOTAL_VALUES:  # checked before decoding: many layers must not add up to a bomb
            raise DataError(
                f"calibration.json unknown.{where}: the arrays hold more than {MAX_TOTAL_VALUES:,} values"
            )
        p = _decode(item.get("projection"), f"{where}.projection", MAX_BANK_VALUES)
        b = _decode(item.get("bank"), f"{where}.bank", MAX_BANK_VALUES)
        if p.shape[0] > MAX_FEATURES or b.shape[1] != p.shape[1] or len(b) != len(bank):
            raise DataError(
                f"calibration.json unknown.{where}: shapes do not fit together (projection "
                f"{list(p.shape)}, bank {list(b.shape)}, the last features' bank {list(bank.shape)})"
            )
        std = _number(item, "std", where, positive=True)
        layers.append(
            Layer(
                stage,
                start,
                p,
                b,
                _number(item, "mean", where),
                std,
                _number(item, "weight", where, positive=True),
            )
        )
    if layers[-1].stop > MAX_FEATURES:
        raise DataError(f"calibration.json unknown.layers: more than {MAX_FEATURES} stage features")
    return UnknownScore(
        projection,
        bank,
        k,
        thresholds[0],
        thresholds[1],
        mean=_number(spec, "mean"),
        std=_number(spec, "std", positive=True),
        layers=tuple(layers),
    )


def _claimed(spec: Any) -> int:
    """The number of values an array spec claims (0 for a malformed one: :func:`_decode` refuses it)."""
    shape = spec.get("shape") if isinstance(spec, Mapping) else None
    if isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        return int(np.prod([max(0, n) for n in shape], dtype=np.float64))
    return 0


def _number(spec: Mapping[str, Any], name: str, where: str = "", positive: bool = False) -> float:
    value = spec.get(name)
    field = f"calibration.json unknown.{where + '.' if where else ''}{name}"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise DataError(f"{field}: expected a finite number")
    if positive and value <= 0:
        raise DataError(f"{field}: expected a number above 0")
    return float(value)
