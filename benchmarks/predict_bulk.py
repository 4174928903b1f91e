"""Bulk classification, side by side in one run: ``thali predict`` (the local engine) against the same
photos through the REST API at concurrency 8.

    python benchmarks/predict_bulk.py [--registry models --domain south_asian_food] [--photos 2000]
                                      [--data DIR] [--out runs/bench]

Photos: the first ``--photos`` readable files of the shared dataset (all classes, sorted). Rows:
- ``thali predict`` as a subprocess writing Parquet, the local engine and ``--engine ray`` (a local Ray of
  this machine's CPUs, 1 CPU an actor): wall time, photos/s, peak RSS of the process and all it starts
  (sampled every 0.2 s: Ray's raylet, object store and actors included);
- ``thali serve`` (gunicorn, 127.0.0.1) and 8 client threads posting each photo once to ``/v1/.../predict``
  (a bounded loop): wall time, photos/s, the server's peak RSS (``VmHWM``).
Timings on a shared machine are noisy: compare rows of one run. Writes
runs/bench/predict-bulk-<time>/results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOCAL = {"http": None, "https": None}


def say(text: str) -> None:
    print(text, flush=True)


def thali() -> list[str]:
    script = Path(sys.executable).parent / "thali"
    return [str(script)] if script.exists() else [sys.executable, "-m", "thali.core.cli"]


def pick(data: Path, count: int) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".webp"}
    found = sorted(p for p in data.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    return found[:count]


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and every process below it, in MB (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for process in tree:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 1024**2


def local_row(args: argparse.Namespace, listing: Path, out: Path, engine: str) -> dict[str, Any]:
    target = out / f"bulk-{engine}.parquet"
    command = [
        *thali(),
        "predict",
        args.domain,
        str(listing),
        "--registry",
        args.registry,
        "--out",
        str(target),
    ]
    command += ["--json", "--no-progress", "--engine", engine]
    if engine == "ray":
        command += ["--threads", "1"]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate(timeout=3600)
    wall = time.perf_counter() - began
    sampler.join(timeout=5)
    if process.returncode != 0:
        raise RuntimeError(f"thali predict --engine {engine} failed: {stderr[-2000:]}")
    summary = json.loads(stdout)
    return {
        "row": f"thali predict --engine {engine}" + (" (local Ray)" if engine == "ray" else ""),
        "photos": summary["photos"],
        "errors": summary["errors"],
        "wall_s": wall,
        "photos_per_s": summary["photos"] / wall,
        "engine_photos_per_s": summary["photos_per_s"],
        "peak_rss_mb": peak[0],
        "log": stderr.strip().splitlines()[-3:],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pgid: int) -> float:
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, ProcessLookupError):
            continue
    return total / 1024


def rest_row(args: argparse.Namespace, paths: list[Path], out: Path, users: int = 8) -> dict[str, Any]:
    import requests

    port = free_port()
    log = open(out / "serve.log", "wb")  # noqa: SIM115 - closed at the end
    server = subprocess.Popen(
        [*thali(), "serve", "--registry", args.registry, "--domain", args.domain, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "THALI_CACHE_ENTRIES": "0"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if requests.get(url + "/readyz", timeout=5, proxies=LOCAL).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError(f"thali serve did not come up: {(out / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
        todo = list(paths)
        lock, errors = threading.Lock(), [0]

        def work() -> None:
            with requests.Session() as session:
                while True:
                    with lock:
                        if not todo:
                            return
                        path = todo.pop()
                    response = session.post(
                        f"{url}/v1/domains/{args.domain}/predict",
                        files={"image": (path.name, path.read_bytes())},
                        timeout=60,
                        proxies=LOCAL,
                    )
                    if response.status_code != 200:
                        with lock:
                            errors[0] += 1

        began = time.perf_counter()
        threads = [threading.Thread(target=work) for _ in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        peak = peak_rss_mb(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    return {
        "row": f"REST /v1 predict, concurrency {users}",
        "photos": len(paths),
        "errors": errors[0],
        "wall_s": wall,
        "photos_per_s": len(paths) / wall,
        "engine_photos_per_s": None,
        "peak_rss_mb": peak,
    }


def main() -> int:
    data_default = (
        Path(os.environ.get("THALI_DATA", REPO.parent / "shared" / "datasets")) / "south_asian_food"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=str(REPO / "models"))
    parser.add_argument("--domain", default="south_asian_food")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=data_default)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error(f"{args.data}: the shared photos are needed (--data DIR or $THALI_DATA)")
    out = args.out / time.strftime("predict-bulk-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    paths = pick(args.data, args.photos)
    listing = out / "photos.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    say(f"{len(paths)} photos from {args.data}")
    rows = []
    for engine in ("local", "ray"):
        rows.append(local_row(args, listing, out, engine))
        say(f"{engine}: {rows[-1]['photos_per_s']:.1f} photos/s, peak {rows[-1]['peak_rss_mb']:.0f} MB")
    rows.append(rest_row(args, paths, out))
    say(f"REST: {rows[-1]['photos_per_s']:.1f} photos/s, peak {rows[-1]['peak_rss_mb']:.0f} MB")
    lines = [
        f"{len(paths)} photos of {args.domain} from {args.registry}, one run, {os.cpu_count()} CPUs:",
        "",
        "| path | photos | errors | wall s | photos/s | photos/s once running | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        running = f"{r['engine_photos_per_s']:.1f}" if r["engine_photos_per_s"] else "-"
        lines.append(
            f"| {r['row']} | {r['photos']:,} | {r['errors']} | {r['wall_s']:.1f} | {r['photos_per_s']:.1f} "
            f"| {running} | {r['peak_rss_mb']:.0f} |"
        )
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    say("\n" + text + f"\n\nwritten: {out / 'results.json'}, {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
