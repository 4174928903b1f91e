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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.config import UnknownConfig
from thali.core.errors import DataError
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
        self.has_features = "features" in names
        self.has_stages = self.has_features and "stage_features" in names
        self.names = [names[0], *(["features"] if self.has_features else [])]
        self.names += ["stage_features"] if self.has_stages else []

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
        def cat(values: list[np.ndarray | None]) -> np.ndarray | None:
            return None if values[0] is None else np.concatenate(values)  # type: ignore[arg-type]

        return Features(
            np.concatenate([p.logits for p in parts]),
            cat([p.features for p in parts]),
            cat([p.stages for p in parts]),
        )


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
    onnx exporter's report); the k-NN score reads them too."""
    from tqdm import tqdm

    run = Outputs(model_path)
    others = {name: Outputs(path) for name, path in (variants or {}).items()} if run.has_features else {}
    others = {name: o for name, o in others.items() if o.has_features}
    other_features: dict[str, dict[str, list[Features]]] = {v: {} for v in others}
    val_out = run(val.images)
    for variant, outputs in others.items():
        other_features[variant]["in-domain"] = [outputs(val.images)]
    cross = set(split.val_cross)
    held_out = np.array([i in cross for i in val.indices]) if cross else np.ones(len(val.labels), bool)
    source = "held-out collections (val_cross)" if cross else "validation split"
    # the collection of each held-out photo: its class's held-out group (a cross-collection split)
    collections = (
        np.array([split.groups.get(int(label), "?") for label in val.labels[held_out]]) if cross else None
    )
    budget_groups = collections if settings.budget == "per_collection" else None
    folders, missing = ood_folders(root, settings.ood)
    ood = {name: [(p, 0) for p in paths] for name, paths in folders.items()}

    def max_probability(logits: np.ndarray) -> np.ndarray:
        return softmax(logits, temperature).max(axis=1)

    scores: dict[str, dict[str, np.ndarray]] = {
        "max_probability": {"in-domain": max_probability(val_out.logits)}
    }
    ood_out: dict[str, Features] = {}
    total = len(split.train) + sum(len(v) for v in ood.values())
    with tqdm(total=total, desc="unknown score", unit="img", disable=not progress, leave=False) as bar:
        train_parts = []
        if run.has_features:
            for images in preprocessed_batches(split.train, transform, limits):
                train_parts.append(run(images))
                bar.update(len(images))
        for name, samples in ood.items():
            parts = []
            for images in preprocessed_batches(samples, transform, limits):
                parts.append(run(images))
                for variant, outputs in others.items():
                    other_features[variant].setdefault(name, []).append(outputs(images))
            bar.update(len(samples))
            if not parts:
                raise DataError(f"export.unknown.ood: none of the photos in {name} could be read")
            ood_out[name] = Features.join(parts)
            scores["max_probability"][name] = max_probability(ood_out[name].logits)
    # every other out-of-domain photo chooses (the score, the thresholds); the rest only measure
    choose = {name: np.arange(len(v.logits)) % 2 == 0 for name, v in ood_out.items()}
    fitted = None
    if run.has_features and train_parts and val_out.features is not None:
        train = Features.join(train_parts)
        fitted = knn.fit(
            train.features,  # type: ignore[arg-type]
            k=settings.k,
            dims=settings.dims,
            max_bank=settings.max_bank,
            stage_features=train.stages,
            stages=stages,
        )
        best: tuple[float, UnknownScore, dict[str, Any]] | None = None
        tried: dict[str, float] = {}  # share of the choosing out-of-domain photos each weight flagged
        for weight in _layer_weights(settings, fitted, bool(ood_out)):
            candidate = fitted.with_layer_weight(weight)
            components = {"in-domain": candidate.components(val_out.features, val_out.stages)}
            for name, out in ood_out.items():
                components[name] = candidate.components(out.features, out.stages)  # type: ignore[arg-type]
            t_knn, t_res = knn.choose_thresholds(
                tuple(v[held_out] for v in components["in-domain"]),  # type: ignore[arg-type]
                settings.max_in_domain_flagged,
                [tuple(v[choose[n]] for v in components[n]) for n in ood_out],  # type: ignore[misc]
                groups=budget_groups,
            )
            candidate = dataclasses.replace(candidate, knn_threshold=t_knn, residual_threshold=t_res)
            margins = {name: candidate.margin(c) for name, c in components.items()}
            caught = float(np.mean([(margins[n][choose[n]] < 0).mean() for n in ood_out])) if ood_out else 0.0
            tried[f"{weight:g}"] = caught
            if best is None or caught > best[0]:  # a tie keeps the earlier weight: the default comes first
                best = (caught, candidate, margins)
        assert best is not None
        _, fitted, scores[knn.METHOD] = best

    report: dict[str, Any] = {
        "in_domain": source,
        "budget": settings.budget if cross else "pooled",
        "in_domain_images": int(held_out.sum()),
        "ood_images": {name: len(v) for name, v in ood.items()},
        "ood_protocol": "every other photo of each out-of-domain set chooses the score and its thresholds; "
        "the rates below are measured on the other half",
        "scores": {},
    }
    thresholds = {
        "max_probability": knn.choose_threshold(
            scores["max_probability"]["in-domain"][held_out], settings.max_in_domain_flagged, budget_groups
        ),
        knn.METHOD: 0.0,  # the margin over both feature thresholds
    }
    chosen: dict[str, float] = {}
    for method, values in scores.items():
        threshold = thresholds[method]
        rates = {"in-domain held out": float((values["in-domain"][held_out] < threshold).mean())}
        rates["validation"] = float((values["in-domain"] < threshold).mean())
        for name in ood:
            rates[name] = float((values[name][~choose[name]] < threshold).mean())
        chosen[method] = (
            float(np.mean([(values[n][choose[n]] < threshold).mean() for n in ood])) if ood else 0
        )
        report["scores"][method] = {"threshold": threshold, "flagged": rates}
        if collections is not None:  # per held-out collection and per class: where the flag bites
            flagged = values["in-domain"][held_out] < threshold
            names = val.labels[held_out]
            report["scores"][method]["flagged_by_collection"] = {
                str(g): float(flagged[collections == g].mean()) for g in sorted(set(collections.tolist()))
            }
            report["scores"][method]["flagged_by_class"] = {
                int(c): float(flagged[names == c].mean()) for c in sorted(set(names.tolist()))
            }
    if fitted is not None:
        report["scores"][knn.METHOD].update(
            knn_threshold=fitted.knn_threshold, residual_threshold=fitted.residual_threshold
        )
        by_variant = {}
        for variant, features in other_features.items():
            joined = {name: Features.join(parts) for name, parts in features.items()}
            flagged = {name: fitted.scores(f.features, f.stages) < 0 for name, f in joined.items()}  # type: ignore[arg-type]
            rates = {"in-domain held out": float(flagged["in-domain"][held_out].mean())}
            rates.update({n: float(flagged[n][~choose[n]].mean()) for n in ood if n in flagged})
            by_variant[variant] = rates
        if by_variant:
            report["scores"][knn.METHOD]["flagged_by_variant"] = by_variant
    needed = int(np.ceil(1 / settings.max_in_domain_flagged)) if settings.max_in_domain_flagged else 0
    warnings = list(missing)
    if held_out.sum() < needed:
        warnings.append(
            f"only {int(held_out.sum())} in-domain held-out photos: the threshold is their lowest score; "
            f"{needed} or more are needed to hold {100 * settings.max_in_domain_flagged:g} % flagged"
        )
    if warnings:
        report["warning"] = "; ".join(warnings)  # `thali export` prints it with the summary

    method = settings.method
    if method == knn.METHOD and fitted is None:
        raise DataError(f"export.unknown.method {knn.METHOD}: the model has no 'features' output to score")
    if method == "auto":
        method = knn.METHOD if fitted is not None else "max_probability"
        if ood and fitted is not None:
            method = max(chosen, key=lambda m: (chosen[m], m == knn.METHOD))
    report["method"] = method
    calibration: dict[str, Any] = {"unknown_threshold": thresholds["max_probability"]}
    if method == knn.METHOD and fitted is not None:
        calibration["unknown"] = fitted.to_spec()
        report.update(k=fitted.k, dims=int(fitted.projection.shape[1]), bank=len(fitted.bank))
        report["stages"] = [layer.stage for layer in fitted.layers]
        if fitted.layers:
            report["layer_weight"] = fitted.layers[0].weight
            if len(tried) > 1:
                report["layer_weights_tried"] = tried
    log.debug(
        "unknown flag: %s; flags %s",
        method,
        ", ".join(f"{n} {100 * r:.1f} %" for n, r in report["scores"][method]["flagged"].items()),
    )
    return calibration, report
