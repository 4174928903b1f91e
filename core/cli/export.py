"""``thali export`` and ``thali bench``."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from .context import Context, print_json
from .extras import require_train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained run to ONNX, graph-optimised fp32, int8 and fp16")
    p.add_argument("run", type=Path, help="a training run directory (with best.pt)")
    p.add_argument("--out", type=Path, help="export folder (default RUN/export)")
    p.add_argument("--data", help="the run's data folder, if it moved (default: the root in split.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", help="comma-separated, e.g. int8,fp16 (default: export.variants)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_export)

    b = sub.add_parser("bench", help="benchmark torch eager and every ONNX variant of an export")
    b.add_argument("model", type=Path, help="an export folder (written by `thali export`)")
    b.add_argument("--data", help="the run's data folder, if it moved")
    b.add_argument(
        "--run",
        type=Path,
        help="the training run the export was made from (default: the export's parent, then "
        "runs/DOMAIN/RUN_ID); its best.pt must match the recorded sha256 for the torch rows",
    )
    b.add_argument("--batch", type=int, default=32, help="batch size for throughput (default 32)")
    b.add_argument("--latency-runs", type=int, default=50, help="batch-1 runs per row (default 50)")
    b.add_argument("--throughput-runs", type=int, default=5, help="full batches per row (default 5)")
    b.add_argument("--limit", type=int, help="score top-1 on the first N validation images only")
    b.add_argument("--provider", action="append", help="ONNX Runtime provider(s) (default: all present)")
    b.add_argument("--no-torch", action="store_true", help="skip the torch eager rows")
    b.add_argument("--synthetic", action="store_true", help="time on random input (no data needed, no top-1)")
    b.add_argument(
        "--out", type=Path, help="folder for bench.json and bench.md (default runs/bench/DOMAIN-TIME)"
    )
    b.add_argument("--json", action="store_true", help="print the JSON on stdout")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=run_bench)


def run_export(ctx: Context) -> int:
    require_train("export")
    from thali.core.exporting.pipeline import export_run

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = ctx.args
    overrides = list(args.overrides)
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        overrides.append(f"export.variants={json.dumps(names)}")
    report = export_run(
        args.run,
        ctx.plugins.registries,
        out_dir=args.out,
        data=args.data,
        overrides=overrides,
        progress=not args.no_progress,
    )
    if args.json:
        print_json(report)
        return 0
    print_summary(report)
    return 0


def print_summary(report: dict[str, Any]) -> None:
    """What `thali export` prints: parity, node counts, each variant with its gate verdict, warnings."""
    print(f"{report['domain']}: export in {report['out_dir']}")
    print(
        f"  parity with torch: max logit difference {report['parity']['max_abs_logit_diff']:.2e}, "
        f"top-1 agreement {report['parity']['top1_agreement']:.3f}"
    )
    opt = report["steps"]["ort_optimize"]
    print(f"  graph optimisation: {opt['nodes_before']} -> {opt['nodes_after']} nodes")
    for name, v in report["variants"].items():
        m, gate = v["metrics"], v.get("gate")
        drop = f"  drop {gate['top1_drop']:+.2f} pts" if gate else ""
        print(
            f"  {name:<13} {v['file']:<24} {v['size_bytes'] / 1e6:7.2f} MB  "
            f"top-1 {100 * m['top1']:.2f}%{drop}  {'passed the gate' if gate else 'reference'}"
        )
    for name, info in report["rejected"].items():
        print(f"  {name:<13} NOT WRITTEN: " + "; ".join(info["reasons"]))
    from thali.core.exporting.unknown import flag_rates, rates_text

    unknown = report.get("unknown") or {}
    if shown := flag_rates(unknown):
        layers = ""
        if stages := unknown.get("stages"):  # the earlier stages the shipped k-NN score reads
            layers = f"; stages {', '.join(map(str, stages))} at weight {unknown['layer_weight']:g}"
        print(f"  unknown flag  {unknown['method']}: {rates_text(shown)}{layers}")
        for variant, rates in unknown["scores"][unknown["method"]].get("flagged_by_variant", {}).items():
            # the same thresholds on this variant's features (served when it is the serving variant)
            print(f"  unknown flag  {variant}: {rates_text(rates)}")
    for warning in [*report["warnings"], *([unknown["warning"]] if unknown.get("warning") else [])]:
        print(f"warning: {warning}")


def run_bench(ctx: Context) -> int:
    from thali.core.exporting.bench import bench_model, write_bench

    args = ctx.args
    result = bench_model(
        args.model,
        ctx.plugins.registries,
        data=args.data,
        batch=args.batch,
        latency_runs=args.latency_runs,
        throughput_runs=args.throughput_runs,
        providers=args.provider,
        torch_eager=not args.no_torch,
        limit=args.limit,
        synthetic=args.synthetic,
        progress=not args.no_progress,
        run=args.run,
    )
    out = args.out or Path("runs") / "bench" / f"{result['domain']}-{time.strftime('%Y%m%d-%H%M%S')}"
    table = write_bench(result, out)
    result["written"] = {"json": str(out / "bench.json"), "markdown": str(out / "bench.md")}
    if args.json:
        print_json(result)
    else:
        print(table)
        print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0
