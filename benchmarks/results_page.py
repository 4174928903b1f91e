"""Write docs/results.md (and its pictures in docs/results/) from measurements anyone can rerun.

    python benchmarks/results_page.py --detail runs/x15/robust \\
        --run "current recipe=runs/x15/baseline" --run "chosen recipe=runs/x15/robust" \\
        [--recipes runs/bench/results.json] [--recipes runs/bench/cross_collection/results.json] \\
        [--unknown-bench runs/bench/unknown] [--bench bench.json] [--data DIR]

Sections, each from its own source (a missing source is named with the command that makes it):

* accuracy: ``--run NAME=RUN_DIR`` training runs (``metrics.json``: whole validation split and, for a
  cross-collection split, the held-out collections ``val_cross``) and the training benchmark's
  ``results.json`` files (``benchmarks/train_south_asian_food.py [--preset cross_collection]``). A run
  trained elsewhere on a copy of the photos (a GPU machine, say) is scored here on the originals with
  ``thali evaluate RUN --data DATA --json > RUN/evaluate.json``: its held-out columns then come from that
  file, marked so;
* calibration, per-class accuracy and the confusion matrix of ``--detail RUN_DIR``: its export
  (``RUN_DIR/export``, ``thali export``) scored here in ONNX Runtime on the run's validation split, with
  the server's own preprocessing: ECE before and after temperature scaling and a reliability diagram;
* unknown rejection: the export's own choice (``export.json``: rates of both scores at the shipped
  threshold) and ``benchmarks/unknown_scores.py`` (four scores side by side, ROC picture);
* latency and throughput: ``thali bench EXPORT --json > bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]


def shown(path: str | Path) -> str:
    """A path as the page shows it: relative to the checkout when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


RECIPES = {  # benchmarks/train_south_asian_food.py's recipes, in words
    "a_linear_probe": "(a) linear probe on frozen Lite0 features",
    "b_full_no_attention": "(b) Lite0, last 2 stages fine-tuned, no attention",
    "c_full_se_attention": "(c) Lite0, last 2 stages fine-tuned, SE head + coordinate attention",
    "d_se_cnn_scratch": "(d) compact SE CNN from scratch, 128 px",
    "e_full_se_attention_ema": "(e) = (c) with 3 stages and an EMA of the weights",
}


def recipe_label(row: dict[str, Any]) -> str:
    augmentation = ", plain augmentation" if "plain" in (row.get("presets") or []) else ""
    name = RECIPES.get(row["recipe"], f"recipe {row['recipe']}")
    return f"{name}{augmentation} ({row['wall_min']:.0f} min on this CPU)"


def run_metrics(run: Path) -> dict[str, Any]:
    """``metrics.json`` of a run; with ``evaluate.json`` beside it (``thali evaluate RUN --data DATA
    --json``, the original photos) the held-out collections' figures come from that scoring instead."""
    metrics = json.loads((run / "metrics.json").read_text())
    rescored = run / "evaluate.json"
    if rescored.is_file() and (cross := json.loads(rescored.read_text()).get("val_cross")):
        metrics = {**metrics, "val_cross": cross, "rescored": True}
    return metrics


def accuracy_section(runs: list[tuple[str, Path]], recipe_files: list[Path]) -> list[str]:
    chose = False  # a cross-collection row whose held-out photos took part in choosing (‡)
    lines = [
        "## Accuracy",
        "",
        "Whole validation split and, for runs on the cross-collection split (`--preset cross_collection`), "
        "the photos of the held-out collections alone: what users with other cameras, plating and light "
        "will see. ECE is after temperature scaling.",
        "",
        "| model | split | val images | val top-1 | val top-5 | val ECE | held-out images | held-out top-1 "
        "| held-out top-5 | held-out ECE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in recipe_files:
        if not path.is_file():
            lines.append(
                f"| *{path}: not measured; run benchmarks/train_south_asian_food.py* | | | | | | | | | |"
            )
            continue
        for row in json.loads(path.read_text()):
            cross = row.get("cross") or {}
            split = "cross-collection" if cross else "random"
            label = recipe_label(row)
            if cross and row.get("temperature_images") is None:  # held-out photos took part in choosing
                label, chose = f"{label} ‡", True
            lines.append(
                f"| {label} | {split} | | {pct(row['top1'])} | {pct(row['top5'])} | "
                f"{num(row['ece_after'])} | {cross.get('images', '')} | {pct(cross.get('top1'))} | "
                f"{pct(cross.get('top5'))} | {num(cross.get('ece'))} |"
            )
    marked = False
    all_metrics = [run_metrics(run) for _, run in runs]  # each run's files read once
    for (name, _), metrics in zip(runs, all_metrics, strict=True):
        val, cross = metrics["val"], metrics.get("val_cross") or {}
        split = "cross-collection" if cross else "random"
        if metrics.get("rescored"):
            name, marked = f"{name} †", True
        if cross and "fitted_on_images" not in metrics.get("calibration", {}):
            name, chose = f"{name} ‡", True
        lines.append(
            f"| {name} | {split} | {val['images']} | {pct(val['top1'])} | {pct(val['top5'])} | "
            f"{num(val['ece'])} | {cross.get('images', '')} | {pct(cross.get('top1'))} | "
            f"{pct(cross.get('top5'))} | {num(cross.get('ece'))} |"
        )
    if marked:
        lines += [
            "",
            "† trained on another machine from a copy of the photos; the held-out columns are this run "
            "scored here on the original photos (`RUN/evaluate.json`: `thali evaluate RUN --data DATA "
            "--json`), the validation columns are the training machine's own (`metrics.json`).",
        ]
    if chose:
        lines += [
            "",
            "‡ trained before `thali train` kept the held-out photos out of its choices: the best epoch and "
            "the temperature were chosen on the whole validation split, held-out collections included, so "
            "its held-out columns read somewhat high (the CPU default trained again, identically, chose "
            "epoch 9 instead of 7 without them: 79.7 % instead of 81.4 %).",
        ]
    if any("val_cross" in metrics for metrics in all_metrics):
        lines += ["", "Held-out collections, accuracy per class:", ""]
        header = "| class | " + " | ".join(n for n, _ in runs) + " |"
        lines += [header, "|---|" + "---:|" * len(runs)]
        per_run = [metrics.get("val_cross") or {} for metrics in all_metrics]
        classes = sorted({c for m in per_run for c in (m.get("per_class") or {})})
        for c in classes:
            cells = []
            for m in per_run:
                entry = (m.get("per_class") or {}).get(c)
                share = entry.get("accuracy", entry.get("recall")) if entry else None
                cells.append(f"{pct(share)} ({entry['support']})" if entry else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines += collection_lines(runs, all_metrics)
    return [*lines, ""]


def _flagged(run: Path) -> dict[str, Any] | None:
    """The shipped unknown score's rates in the run's export (``RUN/export/export.json``), if exported."""
    path = run / "export" / "export.json"
    report = json.loads(path.read_text()).get("unknown") if path.is_file() else None
    return report["scores"].get(report["method"]) if report else None


def collection_lines(runs: list[tuple[str, Path]], all_metrics: list[dict[str, Any]]) -> list[str]:
    """Per held-out collection: each run's top-1 there and the share its export's unknown flag turns
    away (our own dishes: lower is better), then the flag's rates on the out-of-domain sets."""
    from thali.core.training.evaluate import per_collection

    # runs trained before metrics.json carried per_collection: the same figure from its per-class rows
    per_run = [
        cross.get("per_collection") or per_collection(cross.get("per_class") or {})
        for cross in ((m.get("val_cross") or {}) for m in all_metrics)
    ]
    flags = [_flagged(run) for _, run in runs]
    collections = sorted({c for found in per_run for c in found})
    if not collections:
        return []
    lines = [
        "",
        "Held-out collections, top-1 / share of the photos the export's unknown flag turns away "
        "(photos; '-' where the run was not exported):",
        "",
        "| collection | " + " | ".join(n for n, _ in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for c in collections:
        cells = []
        for found, flag in zip(per_run, flags, strict=True):
            entry = found.get(c)
            share = ((flag or {}).get("flagged_by_collection") or {}).get(c)
            cells.append(f"{pct(entry['top1'])} / {pct(share)} ({entry['images']})" if entry else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    sets = sorted({k for flag in flags if flag for k in flag["flagged"]})
    if sets:
        lines += [
            "",
            "The unknown flag of each exported run: the share of each set it turns away.",
            "",
            "| set | " + " | ".join(n for n, _ in runs) + " |",
            "|---|" + "---:|" * len(runs),
        ]
        for name in sets:
            cells = [pct(flag["flagged"].get(name)) if flag else "-" for flag in flags]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def score_export(run: Path, data: Path | None) -> dict[str, Any]:
    """fp32 logits of the run's export on its validation split, with the server's preprocessing."""
    from thali.core.exporting.data import load_validation, run_split
    from thali.core.exporting.gate import run_onnx
    from thali.core.inference import Preprocessor

    export = run / "export"
    split, _ = run_split(run, data)
    preprocess = Preprocessor(json.loads((export / "preprocess.json").read_text()))
    val = load_validation(split, preprocess)
    logits = run_onnx(export / "model.onnx", val.images)
    calibration = json.loads((export / "calibration.json").read_text())
    labels = json.loads((export / "labels.json").read_text())
    cross = set(split.val_cross)
    held_out = np.array([i in cross for i in val.indices])
    return {
        "logits": logits,
        "labels": val.labels,
        "held_out": held_out,
        "temperature": float(calibration["temperature"]),
        "classes": [c["name"] for c in labels["classes"]],
        "export": json.loads((export / "export.json").read_text()),
    }


def reliability_png(
    probs_by_name: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 10
) -> None:
    """One reliability diagram per entry: accuracy against confidence in equal-width bins (bars), the
    diagonal is perfect calibration; drawn with Pillow."""
    from PIL import Image, ImageDraw

    size, pad = 300, 48
    image = Image.new("RGB", (len(probs_by_name) * (size + 2 * pad), size + 2 * pad + 20), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, (confidence, correct)) in enumerate(probs_by_name.items()):
        x0, y0 = i * (size + 2 * pad) + pad, pad
        draw.text((x0, 10), name, fill="black")
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
        draw.line([x0, y0 + size, x0 + size, y0], fill=(180, 180, 180), width=1)
        edges = np.linspace(0, 1, bins + 1)
        for b in range(bins):
            mask = (confidence > edges[b]) & (confidence <= edges[b + 1])
            if not mask.any():
                continue
            acc = float(correct[mask].mean())
            left, right = x0 + size * edges[b], x0 + size * edges[b + 1]
            shade = int(220 - 160 * min(1.0, mask.mean() * 4))  # darker: more photos in the bin
            draw.rectangle([left + 1, y0 + size * (1 - acc), right - 1, y0 + size], fill=(shade, shade, 255))
            mid = (left + right) / 2
            draw.line([mid, y0 + size * (1 - acc), mid, y0 + size * (1 - (edges[b] + edges[b + 1]) / 2)],
                      fill=(214, 39, 40), width=2)  # fmt: skip
        draw.text((x0, y0 + size + 6), "confidence ->   (red: gap to the diagonal)", fill="black")
        draw.text((x0 - 44, y0 - 14), "accuracy", fill="black")
    image.save(path)


def detail_section(run: Path, data: Path | None, pictures: Path) -> list[str]:
    from PIL import Image

    from thali.core.metrics import (
        confusion_image,
        confusion_matrix,
        ece_noise_floor,
        expected_calibration_error,
        softmax,
        topk_accuracy,
    )

    s = score_export(run, data)
    logits, labels, held_out, classes = s["logits"], s["labels"], s["held_out"], s["classes"]
    subsets = {"validation split": np.ones(len(labels), bool)}
    if held_out.any():
        subsets["held-out collections"] = held_out
    lines = [
        "## Calibration",
        "",
        f"`{shown(run)}`'s export (fp32 ONNX, the server's preprocessing), temperature "
        f"{s['temperature']:.3f} fitted on the validation split. ECE: 15 equal-width confidence bins. "
        "The last column is the ECE a perfectly calibrated model with the same confidences would read on "
        "as many photos (median and 90th percentile of 500 simulated outcomes): an ECE inside it is "
        "sampling noise, and a target below it cannot be shown on so few photos.",
        "",
        "| photos | images | top-1 | top-5 | ECE before | ECE after | perfectly calibrated reads |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    diagrams = {}
    for name, mask in subsets.items():
        raw, scaled = softmax(logits[mask]), softmax(logits[mask], s["temperature"])
        lines.append(
            f"| {name} | {int(mask.sum())} | {pct(topk_accuracy(logits[mask], labels[mask], 1))} | "
            f"{pct(topk_accuracy(logits[mask], labels[mask], 5))} | "
            f"{num(expected_calibration_error(raw, labels[mask]))} | "
            f"{num(expected_calibration_error(scaled, labels[mask]))} | "
            "{} to {} |".format(*(num(v) for v in ece_noise_floor(scaled)))
        )
        for when, probs in (("before", raw), ("after", scaled)):
            diagrams[f"{name}, {when} scaling"] = (probs.max(1), probs.argmax(1) == labels[mask])
    reliability_png(diagrams, pictures / "reliability.png")
    lines += ["", "![reliability diagrams](results/reliability.png)", ""]

    cm = confusion_matrix(logits.argmax(1), labels, len(classes))
    Image.fromarray(confusion_image(cm, classes)).save(pictures / "confusion.png")
    lines += [
        "## Per class",
        "",
        "Recall (top-1 accuracy) per class; the held-out column counts only photos of held-out collections.",
        "",
        "| class | validation | held-out collections |",
        "|---|---:|---:|",
    ]
    predicted = logits.argmax(1)
    for k, name in enumerate(classes):
        cells = []
        for mask in (subsets["validation split"], held_out):
            rows = mask & (labels == k)
            cells.append(
                f"{pct(float((predicted[rows] == k).mean()))} ({int(rows.sum())})" if rows.any() else "-"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Confusion matrix of the validation split (rows: true class, row-normalised):", ""]
    lines += ["![confusion matrix](results/confusion.png)", ""]
    lines += unknown_from_export(s["export"])
    return lines


def unknown_from_export(export: dict[str, Any]) -> list[str]:
    from thali.core.inference.unknown import LAYER_WEIGHT  # what an export made before the choice used

    report = export.get("unknown")
    if not report:
        return ["## Unknown rejection", "", "*This export predates the shipped unknown score.*", ""]
    names = list(next(iter(report["scores"].values()))["flagged"])
    lines = [
        "## Unknown rejection",
        "",
        f"Shipped score: **{report['method']}**. Each threshold flags at most the allowed share of "
        f"{report['in_domain']} ({report['in_domain_images']} photos of our own classes the model never "
        "trained on); the columns say which share of each set it flags as unknown.",
        "",
        "| score | threshold | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for method, entry in report["scores"].items():
        cells = " | ".join(pct(entry["flagged"][n]) for n in names)
        lines.append(f"| {method} | {entry['threshold']:.4f} | {cells} |")
    if report.get("stages"):
        lines += [
            "",
            f"The k-NN score also reads backbone stages {', '.join(map(str, report['stages']))}, each "
            f"weighing {report.get('layer_weight', LAYER_WEIGHT):g} next to 1 for the last features.",
        ]
        if tried := report.get("layer_weights_tried"):
            shares = ", ".join(f"{w} → {pct(v)}" for w, v in sorted(tried.items(), key=lambda t: float(t[0])))
            lines[-1] += (
                " The export chose that weight on the half of the out-of-domain photos that choose (mean "
                f"share flagged: {shares}); the rates above are the other half's."
            )
    if report.get("warning"):
        lines += ["", f"Note: {report['warning']}."]
    return [*lines, ""]


def unknown_bench_section(folder: Path, pictures: Path) -> list[str]:
    path = folder / "unknown.json"
    if not path.is_file():
        return ["*Four-score comparison not measured: run benchmarks/unknown_scores.py.*", ""]
    result = json.loads(path.read_text())
    first = next(iter(result["scores"].values()))
    names = [k for k in first if k not in {"threshold", "auc_other_cuisines"}]
    lines = [
        "### Four scores side by side (benchmarks/unknown_scores.py)",
        "",
        f"Run `{shown(result['run'])}`; each threshold accepts "
        f"{100 * result['accept_in_domain']:.0f} % of the in-domain reference photos. The `shipped` row "
        "counts every out-of-domain photo, also the half that chose the export's thresholds and weight: "
        "the export's table above is the other half alone.",
        "",
        "| score | " + " | ".join(f"flags {n}" for n in names) + " | AUC other cuisines |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for score, row in result["scores"].items():
        cells = " | ".join(pct(row[n]) for n in names)
        lines.append(f"| {score} | {cells} | {num(row.get('auc_other_cuisines'))} |")
    if (folder / "roc.png").is_file():
        shutil.copyfile(folder / "roc.png", pictures / "roc.png")
        lines += ["", "![ROC curves](results/roc.png)"]
    return [*lines, ""]


def bench_section(path: Path | None) -> list[str]:
    lines = ["## Latency and throughput", ""]
    if path is None or not path.is_file():
        return [
            *lines,
            "*Not measured: `thali bench EXPORT --json > bench.json`, then --bench bench.json.*",
            "",
        ]
    result = json.loads(path.read_text())
    machine = result.get("machine", {})
    lines += [
        f"`thali bench` of `{shown(result.get('model', ''))}`, batch {result.get('batch')}, "
        f"on {machine.get('cpu_count')} "
        f"CPU cores ({machine.get('processor')}), ONNX Runtime {machine.get('onnxruntime')}.",
        "",
        "| engine | variant | file (MB) | p50 (ms, 1 image) | p95 | img/s (batch) | x torch | x ORT fp32 "
        "| top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['name']} | {row['variant']} | {row.get('file_mb') or '-'} | {row['latency_ms_p50']} | "
            f"{row['latency_ms_p95']} | {row['throughput_img_s']} | {row.get('x_torch_eager') or '-'} | "
            f"{row.get('x_ort_fp32') or '-'} | {pct(row.get('top1'))} |"
        )
    return [*lines, ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR, a row of the accuracy table")
    ap.add_argument(
        "--recipes", action="append", type=Path, default=[], help="a training benchmark results.json"
    )
    ap.add_argument("--detail", type=Path, help="the run (with its export/) shown in detail")
    ap.add_argument("--data", type=Path, help="its data folder, if not where split.json says")
    ap.add_argument("--unknown-bench", type=Path, default=REPO / "runs" / "bench" / "unknown")
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = ap.parse_args()

    runs = []
    for item in args.run:
        name, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "metrics.json").is_file():
            print(f"error: --run {item}: expected NAME=RUN_DIR of a finished run", file=sys.stderr)
            return 2
        runs.append((name, Path(folder)))
    pictures = args.out.parent / "results"
    pictures.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/results_page.py " + " ".join(
        f"'{a}'" if " " in a else a for a in sys.argv[1:]
    )
    lines = [
        "# Results",
        "",
        f"Generated {time.strftime('%Y-%m-%d')} by `{command}` on a {os.cpu_count()}-core CPU; rerun it "
        "to refresh every number and picture on this page. The sealed test set of photos from other "
        "collections reads lower than any validation split: the held-out-collection columns are the "
        "closer estimate.",
        "",
    ]
    lines += accuracy_section(runs, args.recipes)
    if args.detail:
        lines += detail_section(args.detail, args.data, pictures)
    lines += unknown_bench_section(args.unknown_bench, pictures)
    lines += bench_section(args.bench)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"written: {args.out} and {pictures}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
