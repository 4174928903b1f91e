"""Export a trained south_asian_food run with the domain's export settings, then bench every variant.

    python benchmarks/bench_inference.py [RUN_DIR] [--data DIR] [--out runs/bench/inference]
                                         [--synthetic] [--latency-runs 50] [--throughput-runs 5]

RUN_DIR defaults to the default recipe's benchmark run (runs/bench/e_full_se_attention_ema, written by
benchmarks/train_south_asian_food.py). The export uses the *current* export section of the domain pack
(variants, calibration, excluded nodes, gate), so a changed domain.yaml is measured without retraining.
Prints the gate verdicts and the bench table (torch eager fp32, ONNX Runtime fp32 / int8 / fp16, on
every provider present), and writes export.json, bench.json and bench.md. Same engine as `thali bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "bench" / "e_full_se_attention_ema"


def main() -> int:
    from thali.core import build_plugin_manager
    from thali.core.cli.export import print_summary
    from thali.core.domains import resolve_domain
    from thali.core.exporting.bench import bench_model, write_bench
    from thali.core.exporting.pipeline import export_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--data", help="the run's data folder, if it moved")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "inference")
    parser.add_argument("--skip-export", action="store_true", help="bench the export already in --out")
    parser.add_argument("--synthetic", action="store_true", help="random input, no top-1 (no data needed)")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--throughput-runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    registries = build_plugin_manager().registries
    export_dir = args.out / "export"
    if not args.skip_export:
        if not (args.run / "best.pt").is_file():
            print(f"error: {args.run}: no trained run; train one with benchmarks/train_south_asian_food.py")
            return 2
        settings = resolve_domain(registries, "south_asian_food").load_config([]).export.model_dump()
        report = export_run(
            args.run,
            registries,
            out_dir=export_dir,
            data=args.data,
            overrides=[f"export={json.dumps(settings)}"],
        )
        print_summary(report)
    result = bench_model(
        export_dir,
        registries,
        data=args.data,
        batch=args.batch,
        latency_runs=args.latency_runs,
        throughput_runs=args.throughput_runs,
        synthetic=args.synthetic,
    )
    table = write_bench(result, args.out)
    print(table)
    print(f"written: {args.out / 'bench.json'}, {args.out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    from thali.core.errors import ThaliError

    try:
        sys.exit(main())
    except ThaliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
