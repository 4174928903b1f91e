"""The unknown flag an export ships: fitted on the training images' features, its threshold chosen on
photos the model never trained on, the score itself chosen on out-of-domain photos when there are any.

* in-domain held-out photos: the validation photos of held-out collections (``val_cross`` of a
  cross-collection split), else the whole validation split;
* out-of-domain photos: ``export.unknown.ood`` folders beside the data folder (food of other cuisines for
  a dish recogniser, say), never training data;
* scores: ``knn_residual`` (:mod:`thali.core.inference.unknown`: k-NN and residual on the exported
  ``features`` output) and ``max_probability`` (the calibrated top probability); each flags at most
  ``max_in_domain_flagged`` of the in-domain held-out photos. Every other out-of-domain photo chooses
  how ``knn_residual`` shares that budget between its two thresholds, how much its earlier stages weigh
  (``layer_weight: auto``), and which score ships (``auto``: the one that flags more of them); the rates
  are measured on the other half.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.config import UnknownConfig
from thali.core.errors import DataError
from thali.core.export import FEATURES, STAGE_FEATURES
from thali.core.images import DEFAULT_LIMITS, ImageLimits
from thali.core.inference import unknown as knn
from thali.core.inference.postprocess import softmax
from thali.core.inference.unknown import UnknownScore
from thali.core.training.data import Split

from .data import ValidationSet, preprocessed_batches

log = logging.getLogger("thali.export")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MAX_OOD_IMAGES = 5000  # per folder: an out-of-domain folder is a sample, not a dataset


def ood_folders(root: Path, names: Sequence[str]) -> tuple[dict[str, list[Path]], list[str]]:
    """The photos of each ``export.unknown.ood`` folder (a plain name beside the data folder ``root``),
    and a warning for each one that is not there (a domain pack names them; not every machine has them).
    Links are not followed, so a folder cannot point the export elsewhere."""
    found: dict[str, list[Path]] = {}
    missing = []
    for name in names:
        folder = root.parent / name
        if folder.is_symlink() or not folder.is_dir():
            missing.append(
                f"export.unknown.ood: no folder {name} beside the data folder ({root.parent}); not used"
            )
            continue
        photos = []
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.is_symlink():
                photos.append(path)
                if len(photos) >= MAX_OOD_IMAGES:
                    break
        if not photos:
            raise DataError(f"export.unknown.ood: {folder} holds no photos")
        found[name] = photos
    return found, missing


class Outputs:
    """``logits``, ``features`` and ``stage_features`` of an ONNX model, in batches (CPU); the last two
    are ``None`` for a model without them."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.has_features = FEATURES in names
        self.has_stages = self.has_features and STAGE_FEATURES in names
        self.names = [names[0], *([FEATURES] if self.has_features else [])]
        self.names += [STAGE_FEATURES] if self.has_stages else []

    def __call__(self, images: np.ndarray, batch_size: int = 32) -> Features:
        parts: list[list[np.ndarray]] = [[] for _ in self.names]
        for start in range(0, len(images), batch_size):
            out = self.session.run(self.names, {self.input: images[start : start + batch_size]})
            for part, value in zip(parts, out, strict=True):
                part.append(value)
        return Features(*[np.concatenate(p) for p in parts])  # absent outputs stay None


@dataclasses.dataclass
class Features:
    """What :class:`Outputs` gives for a set of photos (rows in the same order)."""

    logits: np.ndarray
    features: np.ndarray | None = None
    stages: np.ndarray | None = None

    @staticmethod
    def join(parts: Sequence[Features]) -> Features:
        """The parts' rows in order (parts of one model: each output is in all of them or in none)."""
        return Features(
            np.concatenate([p.logits for p in parts]),
            _concatenate([p.features for p in parts]),
            _concatenate([p.stages for p in parts]),
        )

    def pooled(self) -> np.ndarray:
        """``features``, which every part of a model with a ``features`` output has."""
        if self.features is None:
            raise DataError("the model has no 'features' output to score")
        return self.features


def _concatenate(values: Sequence[np.ndarray | None]) -> np.ndarray | None:
    arrays = [v for v in values if v is not None]
    if not arrays:
        return None
    if len(arrays) != len(values):
        raise ValueError("parts of different models: an output is in some of them only")
    return np.concatenate(arrays)


def flag_rates(report: Mapping[str, Any]) -> dict[str, float]:
    """The shipped score's flagged shares an ``export.json`` (or card) ``unknown`` report gives: of the
    in-domain reference, then of each out-of-domain set; empty for a report without a shipped score."""
    if report.get("method") not in report.get("scores", {}):
        return {}
    rates = report["scores"][report["method"]]["flagged"]
    return {
        report["in_domain"]: rates["in-domain held out"],
        **{name: rates[name] for name in report.get("ood_images", {})},
    }


def rates_text(rates: Mapping[str, float]) -> str:
    """``flags 4.7 % of validation split, 61.5 % of ood_other_cuisines`` (CLI summary, bundled README)."""
    return "flags " + ", ".join(f"{100 * rate:.1f} % of {name}" for name, rate in rates.items())


def _layer_weights(settings: UnknownConfig, fitted: UnknownScore, has_ood: bool) -> list[float]:
    """The earlier stages' weights to try, the default first (one, when there is nothing to choose)."""
    if settings.layer_weight != "auto":
        return [float(settings.layer_weight)]
    if not fitted.layers or not has_ood:
        return [knn.LAYER_WEIGHT]
    return [knn.LAYER_WEIGHT, *(w for w in knn.LAYER_WEIGHTS if w != knn.LAYER_WEIGHT)]


@dataclasses.dataclass(frozen=True)
class UnknownInputs:
    """What the unknown flag is fitted on (:func:`fit_unknown_flag`): the exported fp32 model, the run's
    split and data folder, its evaluation transform and validation set, the calibrated temperature and
    the ``export.unknown`` settings. ``variants``: the other variants' model files (the shipped score is
    measured on their features too: int8 features drift); ``stages``: ``(stage, width)`` of each group
    of the model's ``stage_features`` output, in order (the onnx exporter's report)."""

    model_path: Path
    split: Split
    root: Path
    transform: Any
    val: ValidationSet
    temperature: float
    settings: UnknownConfig
    variants: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    stages: Sequence[Sequence[int]] = ()
    limits: ImageLimits = DEFAULT_LIMITS
    progress: bool = False


@dataclasses.dataclass(frozen=True)
class UnknownFit:
    """The fitted unknown flag: ``calibration`` is what ``calibration.json`` gets (``unknown_threshold``
    and, for the feature score, ``unknown``), ``report`` what ``export.json`` records as ``unknown``."""

    calibration: dict[str, Any]
    report: dict[str, Any]

    @property
    def method(self) -> str:
        """The score that ships: ``knn_residual`` or ``max_probability``."""
        return str(self.report["method"])


@dataclasses.dataclass(frozen=True)
class _Reference:
    """The in-domain held-out photos the budget holds on, among the validation rows."""

    held_out: np.ndarray  # bool per validation row
    cross: bool  # the held-out collections of a cross-collection split, else the whole validation split
    collections: np.ndarray | None  # the collection of each held-out photo (a cross-collection split)
    budget_groups: np.ndarray | None  # the collections, when the budget holds in each of them

    @property
    def source(self) -> str:
        return "held-out collections (val_cross)" if self.cross else "validation split"

    @property
    def count(self) -> int:
        return int(self.held_out.sum())


def _reference(split: Split, val: ValidationSet, settings: UnknownConfig) -> _Reference:
    cross = set(split.val_cross)
    held_out = np.array([i in cross for i in val.indices]) if cross else np.ones(len(val.labels), bool)
    # the collection of each held-out photo: its class's held-out group (a cross-collection split)
    collections = (
        np.array([split.groups.get(int(label), "?") for label in val.labels[held_out]]) if cross else None
    )
    budget_groups = collections if settings.budget == "per_collection" else None
    return _Reference(held_out, bool(cross), collections, budget_groups)


@dataclasses.dataclass(frozen=True)
class _Measured:
    """The model's outputs on every set of photos the unknown flag reads."""

    val: Features
    train: Features | None  # None: the model has no features output, or no training photo was read
    ood: dict[str, Features]  # per out-of-domain set
    ood_sizes: dict[str, int]  # photos found in each out-of-domain folder
    variants: dict[str, dict[str, Features]]  # other variants with features: "in-domain", then each set
    missing: list[str]  # a warning per out-of-domain folder that is not there


def _read_train(run: Outputs, inputs: UnknownInputs, advance: Callable[[int], object]) -> Features | None:
    parts = []
    for images in preprocessed_batches(inputs.split.train, inputs.transform, inputs.limits):
        parts.append(run(images))
        advance(len(images))
    return Features.join(parts) if parts else None


def _read_ood(
    name: str,
    samples: Sequence[tuple[Path, int]],
    run: Outputs,
    others: Mapping[str, Outputs],
    variant_parts: dict[str, dict[str, list[Features]]],
    inputs: UnknownInputs,
    advance: Callable[[int], object],
) -> Features:
    """One out-of-domain set through the model (and, into ``variant_parts``, through the others)."""
    parts = []
    for images in preprocessed_batches(samples, inputs.transform, inputs.limits):
        parts.append(run(images))
        for variant, outputs in others.items():
            variant_parts[variant].setdefault(name, []).append(outputs(images))
    advance(len(samples))
    if not parts:
        raise DataError(f"export.unknown.ood: none of the photos in {name} could be read")
    return Features.join(parts)


def _measure(inputs: UnknownInputs) -> _Measured:
    """Run the model (and the other variants with features) on the validation, training and
    out-of-domain photos; one progress bar over the training and out-of-domain photos."""
    from tqdm import tqdm

    run = Outputs(inputs.model_path)
    others = {name: Outputs(path) for name, path in inputs.variants.items()} if run.has_features else {}
    others = {name: o for name, o in others.items() if o.has_features}
    val = run(inputs.val.images)
    variant_parts = {
        variant: {"in-domain": [outputs(inputs.val.images)]} for variant, outputs in others.items()
    }
    folders, missing = ood_folders(inputs.root, inputs.settings.ood)
    sets = {name: [(p, 0) for p in paths] for name, paths in folders.items()}
    ood: dict[str, Features] = {}
    total = len(inputs.split.train) + sum(len(v) for v in sets.values())
    with tqdm(total=total, desc="unknown score", unit="img", disable=not inputs.progress, leave=False) as bar:
        train = _read_train(run, inputs, bar.update) if run.has_features else None
        for name, samples in sets.items():
            ood[name] = _read_ood(name, samples, run, others, variant_parts, inputs, bar.update)
    variants = {
        v: {name: Features.join(p) for name, p in parts.items()} for v, parts in variant_parts.items()
    }
    return _Measured(val, train, ood, {name: len(v) for name, v in sets.items()}, variants, missing)


@dataclasses.dataclass(frozen=True)
class _KnnFit:
    """The k-NN and residual score with its thresholds chosen, at the layer weight that won."""

    score: UnknownScore
    margins: dict[str, np.ndarray]  # per photo: "in-domain" (every validation row), then each set
    tried: dict[str, float]  # share of the choosing out-of-domain photos each layer weight flagged


def _with_thresholds(
    candidate: UnknownScore,
    measured: _Measured,
    reference: _Reference,
    choose: Mapping[str, np.ndarray],
    settings: UnknownConfig,
) -> tuple[UnknownScore, dict[str, np.ndarray], float]:
    """``candidate`` with both thresholds chosen, its margins per set, and the share of the choosing
    out-of-domain photos it flags."""
    components = {"in-domain": candidate.components(measured.val.pooled(), measured.val.stages)}
    for name, out in measured.ood.items():
        components[name] = candidate.components(out.pooled(), out.stages)
    knn_in, residual_in = components["in-domain"]
    t_knn, t_res = knn.choose_thresholds(
        (knn_in[reference.held_out], residual_in[reference.held_out]),
        settings.max_in_domain_flagged,
        [(components[n][0][choose[n]], components[n][1][choose[n]]) for n in measured.ood],
        groups=reference.budget_groups,
    )
    candidate = dataclasses.replace(candidate, knn_threshold=t_knn, residual_threshold=t_res)
    margins = {name: candidate.margin(c) for name, c in components.items()}
    caught = (
        float(np.mean([(margins[n][choose[n]] < 0).mean() for n in measured.ood])) if measured.ood else 0.0
    )
    return candidate, margins, caught


def _fit_knn(
    inputs: UnknownInputs, measured: _Measured, reference: _Reference, choose: Mapping[str, np.ndarray]
) -> _KnnFit | None:
    """The feature score, fitted on the training photos' features, at the layer weight that flags
    most choosing out-of-domain photos; ``None`` for a model without features."""
    train, settings = measured.train, inputs.settings
    if train is None or measured.val.features is None:
        return None
    fitted = knn.fit(
        train.pooled(),
        k=settings.k,
        dims=settings.dims,
        max_bank=settings.max_bank,
        stage_features=train.stages,
        stages=inputs.stages,
    )
    best: _KnnFit | None = None
    best_caught = 0.0
    tried: dict[str, float] = {}
    for weight in _layer_weights(settings, fitted, bool(measured.ood)):
        candidate = fitted.with_layer_weight(weight)
        candidate, margins, caught = _with_thresholds(candidate, measured, reference, choose, settings)
        tried[f"{weight:g}"] = caught
        if best is None or caught > best_caught:  # a tie keeps the earlier weight: the default comes first
            best, best_caught = _KnnFit(candidate, margins, tried), caught
    assert best is not None
    return best


def _method_report(
    values: Mapping[str, np.ndarray],
    threshold: float,
    reference: _Reference,
    choose: Mapping[str, np.ndarray],
    labels: np.ndarray,
) -> dict[str, Any]:
    """One score's threshold and flagged shares: of the in-domain reference, of the validation split
    and of each out-of-domain set's measuring half; per collection and class for a cross split."""
    held_out = reference.held_out
    rates = {"in-domain held out": float((values["in-domain"][held_out] < threshold).mean())}
    rates["validation"] = float((values["in-domain"] < threshold).mean())
    for name in choose:
        rates[name] = float((values[name][~choose[name]] < threshold).mean())
    entry: dict[str, Any] = {"threshold": threshold, "flagged": rates}
    collections = reference.collections
    if collections is not None:  # per held-out collection and per class: where the flag bites
        flagged = values["in-domain"][held_out] < threshold
        names = labels[held_out]
        entry["flagged_by_collection"] = {
            str(g): float(flagged[collections == g].mean()) for g in sorted(set(collections.tolist()))
        }
        entry["flagged_by_class"] = {
            int(c): float(flagged[names == c].mean()) for c in sorted(set(names.tolist()))
        }
    return entry


def _choosing_share(
    values: Mapping[str, np.ndarray], threshold: float, choose: Mapping[str, np.ndarray]
) -> float:
    """The mean share of the choosing out-of-domain photos a score flags (0 without any)."""
    return float(np.mean([(values[n][choose[n]] < threshold).mean() for n in choose])) if choose else 0.0


def _variant_rates(
    score: UnknownScore, measured: _Measured, reference: _Reference, choose: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """The shipped feature score's flagged shares on each other variant's features."""
    by_variant = {}
    for variant, sets in measured.variants.items():
        flagged = {name: score.scores(f.pooled(), f.stages) < 0 for name, f in sets.items()}
        rates = {"in-domain held out": float(flagged["in-domain"][reference.held_out].mean())}
        rates.update({n: float(flagged[n][~choose[n]].mean()) for n in choose if n in flagged})
        by_variant[variant] = rates
    return by_variant


def _warnings(missing: Sequence[str], reference: _Reference, settings: UnknownConfig) -> list[str]:
    """Out-of-domain folders not found, and too few in-domain held-out photos for the budget."""
    needed = int(np.ceil(1 / settings.max_in_domain_flagged)) if settings.max_in_domain_flagged else 0
    warnings = list(missing)
    if reference.count < needed:
        warnings.append(
            f"only {reference.count} in-domain held-out photos: the threshold is their lowest score; "
            f"{needed} or more are needed to hold {100 * settings.max_in_domain_flagged:g} % flagged"
        )
    return warnings


def _shipped_method(
    settings: UnknownConfig, has_knn: bool, chosen: Mapping[str, float], has_ood: bool
) -> str:
    """``export.unknown.method``, with ``auto`` resolved: the score that flags more of the choosing
    out-of-domain photos (a tie ships ``knn_residual``), ``knn_residual`` without any."""
    method: str = settings.method
    if method == knn.METHOD and not has_knn:
        raise DataError(f"export.unknown.method {knn.METHOD}: the model has no 'features' output to score")
    if method == "auto":
        method = knn.METHOD if has_knn else "max_probability"
        if has_ood and has_knn:
            method = max(chosen, key=lambda m: (chosen[m], m == knn.METHOD))
    return method


def _knn_summary(fitted: _KnnFit) -> dict[str, Any]:
    """What the report says of a shipped feature score: its size, stages and layer weight."""
    score = fitted.score
    summary: dict[str, Any] = {"k": score.k, "dims": int(score.projection.shape[1]), "bank": len(score.bank)}
    summary["stages"] = [layer.stage for layer in score.layers]
    if score.layers:
        summary["layer_weight"] = score.layers[0].weight
        if len(fitted.tried) > 1:
            summary["layer_weights_tried"] = fitted.tried
    return summary


def fit_unknown_flag(inputs: UnknownInputs) -> UnknownFit:
    """Fit the unknown flag an export ships. Phases: the in-domain held-out reference; the model's
    outputs on every set of photos; the feature score and its thresholds (a model with features); both
    scores' rates; the score that ships."""
    settings = inputs.settings
    reference = _reference(inputs.split, inputs.val, settings)
    measured = _measure(inputs)
    # every other out-of-domain photo chooses (the score, the thresholds); the rest only measure
    choose = {name: np.arange(len(v.logits)) % 2 == 0 for name, v in measured.ood.items()}
    scores: dict[str, dict[str, np.ndarray]] = {
        "max_probability": {
            name: softmax(f.logits, inputs.temperature).max(axis=1)
            for name, f in {"in-domain": measured.val, **measured.ood}.items()
        }
    }
    fitted = _fit_knn(inputs, measured, reference, choose)
    if fitted is not None:
        scores[knn.METHOD] = fitted.margins

    report: dict[str, Any] = {
        "in_domain": reference.source,
        "budget": settings.budget if reference.cross else "pooled",
        "in_domain_images": reference.count,
        "ood_images": measured.ood_sizes,
        "ood_protocol": "every other photo of each out-of-domain set chooses the score and its thresholds; "
        "the rates below are measured on the other half",
        "scores": {},
    }
    thresholds = {
        "max_probability": knn.choose_threshold(
            scores["max_probability"]["in-domain"][reference.held_out],
            settings.max_in_domain_flagged,
            reference.budget_groups,
        ),
        knn.METHOD: 0.0,  # the margin over both feature thresholds
    }
    chosen: dict[str, float] = {}
    for method, values in scores.items():
        report["scores"][method] = _method_report(
            values, thresholds[method], reference, choose, inputs.val.labels
        )
        chosen[method] = _choosing_share(values, thresholds[method], choose)
    if fitted is not None:
        report["scores"][knn.METHOD].update(
            knn_threshold=fitted.score.knn_threshold, residual_threshold=fitted.score.residual_threshold
        )
        if by_variant := _variant_rates(fitted.score, measured, reference, choose):
            report["scores"][knn.METHOD]["flagged_by_variant"] = by_variant
    if warnings := _warnings(measured.missing, reference, settings):
        report["warning"] = "; ".join(warnings)  # `thali export` prints it with the summary

    shipped = _shipped_method(settings, fitted is not None, chosen, bool(measured.ood))
    report["method"] = shipped
    calibration: dict[str, Any] = {"unknown_threshold": thresholds["max_probability"]}
    if shipped == knn.METHOD and fitted is not None:
        calibration["unknown"] = fitted.score.to_spec()
        report.update(_knn_summary(fitted))
    log.debug(
        "unknown flag: %s; flags %s",
        shipped,
        ", ".join(f"{n} {100 * r:.1f} %" for n, r in report["scores"][shipped]["flagged"].items()),
    )
    return UnknownFit(calibration, report)


def fit_unknown(
    model_path: Path,
    split: Split,
    root: Path,
    transform: Any,
    val: ValidationSet,
    temperature: float,
    settings: UnknownConfig,
    *,
    variants: Mapping[str, Path] | None = None,
    stages: Sequence[Sequence[int]] = (),
    limits: ImageLimits = DEFAULT_LIMITS,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(calibration entries, report)``: what ``calibration.json`` gets (``unknown_threshold`` and, for
    the feature scores, ``unknown``) and what ``export.json`` records (rates of both scores, and of the
    shipped one with the features of each other variant in ``variants``: int8 features drift).
    ``stages``: ``(stage, width)`` of each group of the model's ``stage_features`` output, in order (the
    onnx exporter's report); the k-NN score reads them too. The positional form of
    :func:`fit_unknown_flag`."""
    inputs = UnknownInputs(
        model_path,
        split,
        root,
        transform,
        val,
        temperature,
        settings,
        variants=dict(variants or {}),
        stages=stages,
        limits=limits,
        progress=progress,
    )
    fit = fit_unknown_flag(inputs)
    return fit.calibration, fit.report
