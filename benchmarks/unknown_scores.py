"""Which score tells "not one of our dishes" apart best? Max-probability, energy, Mahalanobis and k-NN
distances on penultimate features, side by side on one trained run, and the score its export ships.

    python benchmarks/unknown_scores.py [RUN_DIR] [--data DIR] [--out runs/bench/unknown]

RUN_DIR defaults to the bundled south_asian_food run (runs/bundled/south_asian_food/run, written by
benchmarks/build_bundled_models.py); its export (RUN_DIR/export, ``thali export``) gives the logits and
the penultimate ``features`` in ONNX Runtime, with the server's preprocessing. In-domain photos: the
run's validation images, and its cross-collection subset when the split has one (``val_cross`` in
split.json); the threshold of every score is set so that 95 % of those are accepted (at most 5 %
flagged). Out-of-domain photos: ``ood_other_cuisines`` (400 photos of 10 dishes from other cuisines:
the hard case), ``plant_disease`` (leaves: not food) and the sample photos that ship with scikit-image
(non-food). The last row, ``shipped``, is the export's own k-NN score at the threshold it ships (what
the server flags). Prints, per score, the share of each set flagged as unknown and the ROC AUC; writes
unknown.json and a ROC picture (roc.png) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "bundled" / "south_asian_food" / "run"
ACCEPT = 0.95  # share of in-domain photos the threshold keeps


def features_and_logits(export: Path, paths: list[Path], batch: int = 32) -> tuple[Any, list[int]]:
    """The export's fp32 outputs with the server's preprocessing (a :class:`Features`: logits, the
    penultimate features the classifier's linear layer reads, and ``stage_features``, None for an export
    without them), and the positions of the photos they belong to (a broken photo is skipped)."""
    from tqdm import tqdm

    from thali.core.exporting.unknown import Features, Outputs
    from thali.core.inference import Preprocessor

    preprocess = Preprocessor(json.loads((export / "preprocess.json").read_text()))
    model = Outputs(export / "model.onnx")  # the export's own reader: logits, features, stage_features
    parts, kept = [], []
    for start in tqdm(range(0, len(paths), batch), desc="features", unit="batch", leave=False):
        images = []
        for i, path in enumerate(paths[start : start + batch], start):
            try:
                images.append(preprocess(path.read_bytes()))
                kept.append(i)
            except Exception as exc:  # a broken photo is skipped, not fatal
                print(f"skipped {path}: {exc}", file=sys.stderr)
        if images:
            parts.append(model(np.stack(images), batch_size=batch))
    return Features.join(parts), kept


def scores(outputs: Any, fit: dict[str, Any], temperature: float, shipped: Any = None) -> dict[str, Any]:
    """Higher = more in-domain, for every score, from :func:`features_and_logits`' outputs."""
    feats, logits = outputs.features, outputs.logits
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scaled = logits / temperature
    top = scaled.max(1)
    energy = temperature * (top + np.log(np.exp(scaled - top[:, None]).sum(1)))  # T * logsumexp(logits / T)
    centred = feats[:, None, :] - fit["means"][None, :, :]
    maha = np.einsum("nkd,de,nke->nk", centred, fit["precision"], centred).min(1)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = unit @ fit["bank"].T
    knn = np.sort(sims, axis=1)[:, -fit["k"]]
    out = {"max_probability": p.max(1), "energy": energy, "mahalanobis": -maha, "knn_cosine": knn}
    if shipped is not None:  # the export's own score (k-NN on the last features and earlier stages)
        out["shipped"] = shipped.scores(feats, outputs.stages)
    return out


def fit_features(feats: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, Any]:
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in classes])
    centred = feats - means[np.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(feats)
    shrink = 0.1 * np.trace(cov) / cov.shape[0]  # Ledoit-Wolf-like: the covariance of ~3k points is noisy
    precision = np.linalg.inv(cov + shrink * np.eye(cov.shape[0]))
    bank = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    return {"means": means, "precision": precision, "bank": bank, "k": k}


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of an in-domain photo > score of an out-of-domain one)."""
    both = np.concatenate([pos, neg])
    ranks = both.argsort().argsort() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def skimage_photos(out: Path) -> list[Path]:
    """The colour photos that ship with scikit-image (astronaut, cat, coffee, rocket, ...)."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
             "colorwheel", "retina", "motorcycle_left", "logo", "stereo_motorcycle"]  # fmt: skip
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            image = getattr(data, name)()
        except Exception:  # a sample that needs a download is simply not used
            continue
        image = image[0] if isinstance(image, tuple) else image
        if image.ndim != 3 or image.shape[2] < 3:
            continue
        path = out / f"{name}.png"
        Image.fromarray(np.asarray(image[..., :3], dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", type=Path, default=DEFAULT_RUN)
    default_data = Path(os.environ.get("THALI_DATA") or REPO.parent / "shared" / "datasets")
    ap.add_argument("--data", type=Path, default=default_data, help="folder holding the datasets")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "unknown")
    args = ap.parse_args()

    from thali.core.inference.unknown import load_spec

    export = args.run / "export"
    if not (export / "model.onnx").is_file():
        print(f"error: {export}: no export; run `thali export {args.run}` first", file=sys.stderr)
        return 2
    calibration = json.loads((export / "calibration.json").read_text())
    temperature, shipped = float(calibration["temperature"]), load_spec(calibration)
    domain = json.loads((export / "labels.json").read_text())["domain"]
    split = json.loads((args.run / "split.json").read_text())
    root = Path(split["root"]) if Path(split["root"]).is_dir() else args.data / domain
    train = [(root / p, int(y)) for p, y in split["train"]]
    val = [(root / p, int(y)) for p, y in split["val"]]
    cross = set(split.get("val_cross", []))  # positions in val of the held-out collections' photos

    def photos(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})

    sets = {
        "other cuisines": photos(args.data / "ood_other_cuisines"),
        "plant leaves": photos(args.data / "plant_disease"),
        "non-food (scikit-image)": skimage_photos(args.out / "skimage"),
    }
    train_out, kept = features_and_logits(export, [p for p, _ in train])
    fit = fit_features(train_out.features, np.array([train[i][1] for i in kept]))
    val_out, kept = features_and_logits(export, [p for p, _ in val])
    in_domain = {"validation": scores(val_out, fit, temperature, shipped)}
    if cross:
        keep = np.array([i in cross for i in kept])
        in_domain["held-out collections"] = {k: v[keep] for k, v in in_domain["validation"].items()}
    reference = in_domain.get("held-out collections", in_domain["validation"])
    outside = {}
    for name, paths in sets.items():
        if paths:
            outside[name] = scores(features_and_logits(export, paths)[0], fit, temperature, shipped)

    result: dict[str, Any] = {"run": str(args.run), "accept_in_domain": ACCEPT}
    result["scores"] = flag_table(in_domain, outside, reference, shipped)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unknown.json").write_text(json.dumps(result, indent=2))
    _roc_picture(reference, outside, args.out / "roc.png")
    print(f"\nwritten: {args.out / 'unknown.json'}, {args.out / 'roc.png'}")
    return 0


def flag_table(
    in_domain: dict[str, Any], outside: dict[str, Any], reference: dict[str, Any], shipped: Any
) -> dict[str, Any]:
    """Print, per score, the share of each set it flags and its AUC on other cuisines; returns the
    same per score (unknown.json's ``scores``)."""
    table: dict[str, Any] = {}
    header = [
        "score",
        *[f"flags {n}" for n in in_domain],
        *[f"flags {n}" for n in outside],
        "AUC other cuisines",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for score in reference:
        shipped_here = score == "shipped" and shipped is not None  # at the threshold the server uses
        threshold = shipped.threshold if shipped_here else float(np.quantile(reference[score], 1 - ACCEPT))
        row: dict[str, Any] = {"threshold": threshold}
        cells = [score]
        for name, values in {**in_domain, **outside}.items():
            share = float((values[score] < threshold).mean())
            row[name] = share
            cells.append(f"{100 * share:.1f} %")
        if "other cuisines" in outside:
            row["auc_other_cuisines"] = auc(reference[score], outside["other cuisines"][score])
            cells.append(f"{row['auc_other_cuisines']:.3f}")
        table[score] = row
        print("| " + " | ".join(cells) + " |")
    return table


def _roc_picture(reference: dict[str, Any], outside: dict[str, Any], path: Path) -> None:
    """One ROC panel per out-of-domain set (in-domain accepted against out-of-domain accepted), drawn
    with Pillow so the benchmark needs no plotting library."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    size, pad = 320, 44
    image = Image.new("RGB", (len(outside) * (size + 2 * pad), size + 2 * pad + 70), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, values) in enumerate(outside.items()):
        x0, y0 = i * (size + 2 * pad) + pad, pad
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
        draw.line([x0, y0 + size, x0 + size, y0], fill=(200, 200, 200))
        draw.text((x0, 8), f"in-domain vs {name}", fill="black")
        draw.text((x0, y0 + size + 6), "out-of-domain accepted ->", fill="black")
        draw.text((x0 - 40, y0 - 14), "in-domain accepted", fill="black")
        for j, score in enumerate(reference):
            both = np.concatenate([reference[score], values[score]])
            cuts = np.quantile(both, np.linspace(0, 1, 201))
            points = [
                (
                    x0 + size * float((values[score] >= c).mean()),
                    y0 + size * (1 - float((reference[score] >= c).mean())),
                )
                for c in cuts
            ]
            draw.line(points, fill=colours[j % len(colours)], width=2)
            draw.text((x0 + 8, y0 + size + 24 + 12 * j), score, fill=colours[j % len(colours)])
    image.save(path)


if __name__ == "__main__":
    sys.exit(main())
