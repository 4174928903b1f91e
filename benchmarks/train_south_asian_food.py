"""Train the south_asian_food pack on this machine's CPU with four recipes, side by side.

    python benchmarks/train_south_asian_food.py [--data DIR] [--out runs/bench] [--quick]
    python benchmarks/train_south_asian_food.py --preset cross_collection   # held-out collections too

(a) frozen-feature linear probe, (b) the full recipe without attention, (c) the full recipe with SE +
attention, (d) the compact SE CNN from scratch; optional (e) = (c) with three training stages and an
EMA of the weights (--recipes e_full_se_attention_ema). Prints wall time, training images/s, validation
top-1 / top-5 / ECE (before -> after temperature scaling), and writes results.json (with
``--preset cross_collection`` also the held-out collections' top-1 / top-5 / ECE, under ``cross``);
``benchmarks/results_page.py`` puts both into docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]

# each recipe states what it trains, so that changing domain.yaml does not change the recipes;
# domains/south_asian_food/domain.yaml ships (e), the best of them
FULL = [
    "model.backbone=tf_efficientnet_lite0",
    "model.pretrained=offline",
    "model.attention=[{name: se, where: head}, {name: coord, where: stages, stages: [5]}]",
    "training.mode=frozen_features",
    "training.trainable_stages=2",
    "training.cache_views=4",
    "training.epochs=20",
    "training.ema.enabled=false",
    "training.early_stopping.patience=6",
]
RECIPES: dict[str, list[str]] = {
    "a_linear_probe": [
        *FULL,
        "training.trainable_stages=0",
        "training.cache_views=2",
        "model.attention=[]",
        "training.epochs=12",
        "optimizer.lr=0.003",
        "augmentation.mixup_alpha=0",
    ],
    "b_full_no_attention": [*FULL, "model.attention=[]"],
    "c_full_se_attention": [*FULL],
    # (c) with the last three stages training and an EMA of the weights
    "e_full_se_attention_ema": [
        *FULL,
        "training.trainable_stages=3",
        "training.ema.enabled=true",
        "training.ema.decay=0.998",
        "training.epochs=24",
        "training.early_stopping.patience=8",
    ],
    "d_se_cnn_scratch": [
        "model.backbone=se_cnn",
        "model.pretrained=none",
        "model.params={width: 32, input_size: 128}",
        "model.attention=[]",
        "training.mode=full",
        "training.ema.enabled=false",
        "training.epochs=15",
        "training.batch_size=64",
        "optimizer.lr=0.003",
        "training.early_stopping.enabled=false",
    ],
}


def subset(root: Path, per_class: int) -> Path:
    """A temporary ImageFolder of symlinks with the first ``per_class`` images of each class."""
    out = Path(tempfile.mkdtemp(prefix="thali-subset-"))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / folder.name).mkdir()
        for image in sorted(folder.iterdir())[:per_class]:
            (out / folder.name / image.name).symlink_to(image)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("THALI_DATA", REPO.parent / "shared" / "datasets"))
    parser.add_argument("--data", type=Path, default=default_data / "south_asian_food")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument(
        "--recipes", default="a_linear_probe,b_full_no_attention,c_full_se_attention,d_se_cnn_scratch"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 images/class, 1 epoch")
    parser.add_argument(
        "--preset",
        action="append",
        default=[],
        help="presets of the pack on top of every recipe (cross_collection: measure on held-out "
        "collections; runs and results.json then go to --out/PRESET)",
    )
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"error: {args.data}: dataset not found (set THALI_DATA or --data)", file=sys.stderr)
        return 2

    from thali.core import build_plugin_manager
    from thali.core.training.trainer import TrainOptions, train

    registries = build_plugin_manager().registries
    pack = registries.domains.create("south_asian_food")
    if args.preset:
        args.out = args.out / "+".join(args.preset)
    data = subset(args.data, 12) if args.quick else args.data
    rows = []
    for name in args.recipes.split(","):
        overrides = RECIPES[name] + (["training.epochs=1", "training.cache_views=1"] if args.quick else [])
        config = pack.load_config(overrides, args.preset)
        run_dir = args.out / name
        started = time.perf_counter()
        result = train(config, registries, TrainOptions(run_dir=run_dir, data=str(data), progress=True))
        wall = time.perf_counter() - started
        m = result["metrics"]
        row = {
            "recipe": name,
            "wall_min": wall / 60,
            "epochs": len(result["state"]["history"]),
            "best_epoch": m["best_epoch"],
            "train_img_s": result["train_images_per_s"],
            "top1": m["val"]["top1"],
            "top5": m["val"]["top5"],
            "ece_before": m["calibration"]["ece_before"],
            "ece_after": m["calibration"]["ece_after"],
            "temperature": m["calibration"]["temperature"],
            "temperature_images": m["calibration"].get("fitted_on_images"),  # without held-out photos
            "run": str(run_dir),
            "presets": args.preset,
            **(
                {"cross": {k: m["val_cross"][k] for k in ("images", "top1", "top5", "ece")}}
                if "val_cross" in m
                else {}
            ),
            "notes": result["notes"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"  # runs of other recipes from earlier invocations are kept
    earlier = (
        [r for r in json.loads(results.read_text()) if r["recipe"] not in args.recipes.split(",")]
        if results.is_file()
        else []
    )
    rows = sorted(earlier + rows, key=lambda r: r["recipe"])
    results.write_text(json.dumps(rows, indent=1))
    print()
    print(
        "| recipe | wall (min) | epochs (best) | train img/s | val top-1 | val top-5 | ECE before -> after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['wall_min']:.1f} | {r['epochs']} ({r['best_epoch']}) | "
            f"{r['train_img_s']:.1f} | {100 * r['top1']:.1f} % | {100 * r['top5']:.1f} % | "
            f"{r['ece_before']:.3f} -> {r['ece_after']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
