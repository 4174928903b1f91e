"""One process against torchrun with N processes, side by side in one run: the south_asian_food pack with
``training.mode=frozen_features`` on the real dataset. Under torchrun every rank computes only its shard
of the feature cache and the ranks exchange the shards; this prints the rows each rank computed (they
must add up to the cache, computed once in total), the wall time of each run and the validation top-1 /
top-5 / ECE of both.

    python benchmarks/torchrun_frozen_features.py [--data DIR] [--nproc 2] [--out runs/bench/torchrun]
        [--set training.epochs=6 ...]

On a CPU the ranks use gloo and one thread each (OMP_NUM_THREADS=1); with GPUs, nccl. Results go to
``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a shorter run of the pack's default recipe: two cached views, six epochs, no early stop (both runs
# then do the same number of epochs)
DEFAULT_SET = ["training.cache_views=2", "training.epochs=6", "training.early_stopping.enabled=false"]


def thali_train(command: list[str], run_dir: Path, data: Path, sets: list[str], env: dict[str, str]) -> dict:
    args = [*command, "train", "south_asian_food", "--data", str(data), "--run-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    started = time.perf_counter()
    result = subprocess.run([*args, "--no-progress"], capture_output=True, text=True, env=env)
    took = time.perf_counter() - started
    (run_dir.parent / f"{run_dir.name}.log").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    shares = re.findall(
        r"(train|val) feature cache computed once across \d+ ranks: ([^=]+)= (\S+) rows", result.stdout
    )
    return {
        "wall_s": round(took, 1),
        "top1": metrics["val"]["top1"],
        "top5": metrics["val"]["top5"],
        "ece": metrics["val"]["ece"],
        "cache_rows": {part: {"per_rank": rows.strip(), "total": total} for part, rows, total in shares},
        "cache_note": next((n for n in result.stdout.splitlines() if "cached frozen features" in n), ""),
        "epochs": [line for line in result.stderr.splitlines() if line.startswith("epoch ")],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "south_asian_food")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "torchrun")
    parser.add_argument("--set", dest="sets", action="append", default=None, help="config overrides")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no dataset at {args.data}: pass --data")
    sets = args.sets if args.sets is not None else DEFAULT_SET
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    single = thali_train([sys.executable, "-m", "thali.core.cli"], args.out / "single", args.data, sets, env)
    print(f"single process: {single['wall_s']:.0f} s, top-1 {single['top1']:.4f}")
    ddp_env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(args.nproc), "-m", "thali.core.cli"]
    ddp = thali_train(command, args.out / "torchrun", args.data, sets, ddp_env)
    results = {"sets": sets, "nproc": args.nproc, "single": single, "torchrun": ddp}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| run | wall time | val top-1 | top-5 | ECE | feature cache rows computed |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in (("1 process", single), (f"torchrun, {args.nproc} processes", ddp)):
        rows = (
            "; ".join(f"{k}: {v['per_rank']} = {v['total']}" for k, v in r["cache_rows"].items())
            or "all, in one"
        )
        print(
            f"| {name} | {r['wall_s'] / 60:.1f} min | {100 * r['top1']:.1f} % | {100 * r['top5']:.1f} % "
            f"| {r['ece']:.3f} | {rows} |"
        )
    print(f"\ntop-1 difference: {100 * (ddp['top1'] - single['top1']):+.2f} points; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
