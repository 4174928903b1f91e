"""The serving install against the full one: wall time from a clean pip cache and size on disk.

    python benchmarks/install_size.py [--out runs/bench/install] [--keep]

Builds two fresh virtual environments side by side in one run, each with pip's cache switched off
(``--no-cache-dir``, so every wheel is fetched and unpacked as on a newcomer's machine):

  serving   pip install .          core, registry, REST API, UI, ONNX Runtime (what `make run` installs)
  full      pip install '.[train]' + torch, timm, albumentations, tensorboard, onnx (training and export)

and prints a table: seconds, MB on disk, number of distributions, and whether ``torch`` is present.
Writes ``install.json`` to ``--out``. The environments are removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALLS = {"serving": ".", "full": ".[train]"}


def du_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = Path(root, name)
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 1e6


def measure(name: str, spec: str, where: Path) -> dict[str, object]:
    venv = where / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [*pip, "install", "--no-cache-dir", "-q", spec], cwd=REPO, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name}: pip install {spec} failed:\n{done.stderr[-2000:]}")
    listed = subprocess.run([*pip, "list", "--format=json"], capture_output=True, text=True, check=True)
    names = {d["name"].lower() for d in json.loads(listed.stdout)}
    return {
        "install": name,
        "command": f"pip install '{spec}'",
        "seconds": round(seconds, 1),
        "size_mb": round(du_mb(venv), 0),
        "distributions": len(names),
        "torch": "torch" in names,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "install")
    ap.add_argument("--keep", action="store_true", help="keep the two environments (printed)")
    args = ap.parse_args()
    where = Path(tempfile.mkdtemp(prefix="thali-install-"))
    try:
        rows = []
        for name, spec in INSTALLS.items():
            print(f"installing {name} ({spec}) into {where / name} ...", flush=True)
            rows.append(measure(name, spec, where))
        shutil.rmtree(REPO / "build", ignore_errors=True)  # what `pip install .` leaves in the source tree
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)
    serving, full = rows
    print()
    print("| install | command | seconds (clean cache) | MB on disk | distributions | torch |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['install']} | `{r['command']}` | {r['seconds']} | {r['size_mb']:.0f} | "
            f"{r['distributions']} | {'yes' if r['torch'] else 'no'} |"
        )
    print(
        f"\nserving / full: {serving['seconds'] / full['seconds']:.2f}x the time, "
        f"{serving['size_mb'] / full['size_mb']:.2f}x the disk"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "install.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.keep:
        print(f"kept: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
