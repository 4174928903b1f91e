"""Load-test the REST service with locust: batching on and off, the cache, the raw engine, side by side.

    python benchmarks/api_load.py [--registry URL --domain NAME[@REF]] [--quick] [--requests-per-row 1500]
                                  [--threads 32] [--variant int8] [--data DIR] [--out runs/bench]

The model: the registry model of --registry/--domain if given; otherwise a *speed-only package* built
once into runs/bench/api_registry (reused after): the south_asian_food pack's architecture
(EfficientNet-Lite0 + SE head + coord attention, 224 px, offline ImageNet backbone weights) with an
untrained head, exported fp32 + int8 with the pack's export settings (gate relaxed: the head is random)
and published as production. Its answers are meaningless; its speed is the real model's.

Measured, each row on its own `thali serve` (gunicorn gthread, 127.0.0.1, a free port, SIGTERM at the
end) driven by locust in headless mode in a subprocess (benchmarks/locustfile_api.py; this process never
imports locust): batching on (max batch 32, wait 5 ms) and off (max batch 1) at 1, 8 and 32 concurrent
users posting real photos the server has not seen (unique bytes, so the answer cache never hits), and
the cache-hit path (one photo, again and again) at 8 users. Each row stops after its request budget (a
warm-up first, not counted) or its time cap. Beside them, the raw engine: the served variant in ONNX
Runtime in this process at batch 32. Prints the table and the targets (met / not met), a second table
of where the time goes (decode / queue / inference per answer, batch sizes, CPU of server and locust),
and writes runs/bench/api-load-<time>/results.json and table.md. Timings on a shared machine are noisy:
compare rows of one run, never runs of different days.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile_api.py"
DOMAIN = "south_asian_food"
SPEED_FOLDER = REPO / "runs" / "bench" / "api_registry"
POOL_SIZE = 200
SPLIT_IMAGES = 64  # validation + training images of the speed package's fabricated run
RELAXED_GATE = [
    "export.variants=[fp32, int8]",
    "export.gate.max_top1_drop=100",
    "export.gate.max_class_drop=100",
]
LOCAL = {"http": None, "https": None}


@dataclass(frozen=True)
class RowSpec:
    name: str
    users: int
    batching: bool
    mode: str  # "miss": unique bytes every request; "hit": one image, from the cache; v2_bytes, v2_fp32,
    # grpc: the Open Inference Protocol (REST with binary tensor data: the JPEG, or the prepared tensor; gRPC)
    env: tuple[tuple[str, str], ...] = ()  # server settings of this row only


#: the engine as served before issue 27: one batch at a time on a session whose intra-op threads spin
BEFORE = (("THALI_ENGINE_WORKERS", "1"), ("THALI_ORT_SPINNING", "true"))

ROWS = [  # run in this order (on and off of one concurrency close in time); shown grouped
    RowSpec("before c1", 1, True, "miss", BEFORE),
    RowSpec("batched c1", 1, True, "miss"),
    RowSpec("unbatched c1", 1, False, "miss"),
    RowSpec("batched c8", 8, True, "miss"),
    RowSpec("unbatched c8", 8, False, "miss"),
    RowSpec("before c32", 32, True, "miss", BEFORE),
    RowSpec("batched c32", 32, True, "miss"),
    RowSpec("unbatched c32", 32, False, "miss"),
    RowSpec("cache hit c8", 8, True, "hit"),
    # the Open Inference Protocol beside /v1 (batching on): REST with binary tensor data, and gRPC
    RowSpec("v2 bytes c8", 8, True, "v2_bytes"),
    RowSpec("v2 fp32 c8", 8, True, "v2_fp32"),
    RowSpec("grpc c8", 8, True, "grpc"),
    RowSpec("v2 bytes c32", 32, True, "v2_bytes"),
    RowSpec("v2 fp32 c32", 32, True, "v2_fp32"),
    RowSpec("grpc c32", 32, True, "grpc"),
]
SHOWN = [
    "before c1",
    "before c32",
    "batched c1",
    "batched c8",
    "batched c32",
    "unbatched c1",
    "unbatched c8",
    "unbatched c32",
    "cache hit c8",
    "v2 bytes c8",
    "v2 fp32 c8",
    "grpc c8",
    "v2 bytes c32",
    "v2 fp32 c32",
    "grpc c32",
]


def say(text: str) -> None:
    print(text, flush=True)


# --- the model ------------------------------------------------------------------------------------------


def class_images(root: Path, classes: list[str]) -> dict[str, list[Path]]:
    """Image files of each class folder under ``root``, sorted (empty lists where a folder is missing)."""
    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    found: dict[str, list[Path]] = {}
    for name in classes:
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes) if folder.is_dir() else []
        found[name] = files
    return found


def synthetic_images(folder: Path, classes: list[str], per_class: int) -> dict[str, list[Path]]:
    """Photo-sized JPEGs (320 x 240, smooth colour fields with noise) per class, written once."""
    import numpy as np
    from PIL import Image

    found: dict[str, list[Path]] = {}
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:240, 0:320].astype(np.float32)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        found[name] = []
        for i in range(per_class):
            path = folder / name / f"synthetic_{i:03d}.jpg"
            if not path.is_file():
                base = np.array([(37 * c) % 256, (91 * c + 40) % 256, (53 * c + 90) % 256], dtype=np.float32)
                wave = 60 * np.sin((xs * (i + 1) + ys * (c + 1)) / 40.0)[..., None]
                pixels = np.clip(base + wave + rng.normal(0, 12, (240, 320, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path, "JPEG", quality=88)
            found[name].append(path)
    return found


def readable(paths: list[Path]) -> list[Path]:
    """The paths that decode within thali's default image limits (the server would refuse the others)."""
    from thali.core.errors import DataError
    from thali.core.images import decode_rgb

    good = []
    for path in paths:
        try:
            decode_rgb(path)
            good.append(path)
        except (DataError, OSError, ValueError):
            continue
    return good


def photos(
    data: Path, classes: list[str], per_class: int, synthetic_folder: Path
) -> tuple[Path, dict[str, list[Path]]]:
    """(root, class -> image paths): the real dataset if present, else synthetic JPEGs."""
    if data.is_dir():
        found = class_images(data, classes)
        if sum(len(v) for v in found.values()) >= len(classes):
            return data, found
    say(f"{data}: no dataset here; using synthetic JPEGs in {synthetic_folder}")
    return synthetic_folder, synthetic_images(synthetic_folder, classes, per_class)


def build_speed_package(folder: Path, data: Path, registries: Any) -> str:
    """Publish the speed-only package into ``folder/registry`` once; return the registry URL."""
    import shutil

    import torch
    import yaml

    from thali.core.domains import resolve_domain
    from thali.core.exporting.pipeline import export_run
    from thali.core.training import checkpoint as ckpt
    from thali.core.training.data import Split, write_split
    from thali.core.training.model import build_classifier
    from thali.registry import ModelRegistry

    url = folder / "registry"
    registry = ModelRegistry(url)
    if DOMAIN in registry.domains() and "production" in registry.aliases(DOMAIN):
        say(f"speed package: reusing {url} ({DOMAIN} production)")
        return str(url)
    say(f"speed package: building {DOMAIN} (pack architecture, offline backbone weights, random head)")
    config = resolve_domain(registries, DOMAIN).load_config(["model.pretrained=offline"])
    classes = config.class_names
    torch.manual_seed(0)
    model = build_classifier(config, registries)
    model.eval()
    root, found = photos(data, classes, 4, folder / "synthetic")
    val: list[tuple[Path, int]] = []
    train: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):  # round-robin over classes: half validation, half training
        files = readable(found[name][:6])
        val += [(p, label) for p in files[:1]]
        train += [(p, label) for p in files[1:2]]
    for label, name in enumerate(classes):
        if len(val) + len(train) >= SPLIT_IMAGES:
            break
        extra = readable(found[name][2:3])
        val += [(p, label) for p in extra]
    run_dir, export_dir = folder / "run", folder / "export"
    for stale in (run_dir, export_dir):
        shutil.rmtree(stale, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    best = {
        "model": model.state_dict(),
        "classes": list(classes),
        "preprocess": ckpt.plain(model.preprocess),
        "epoch": 0,
    }
    ckpt.save_atomic(best, run_dir / "best.pt")
    write_split(run_dir / "split.json", Split(train, val, []), root, classes)
    say(f"speed package: exporting fp32 + int8 ({len(val)} validation, {len(train)} calibration images)")
    started = time.perf_counter()
    report = export_run(run_dir, registries, out_dir=export_dir, overrides=RELAXED_GATE, progress=False)
    missing = {"fp32", "int8"} - set(report["variants"])
    if missing:
        raise RuntimeError(f"the speed package lacks {sorted(missing)}: {report['rejected']}")
    published = registry.publish(export_dir, aliases=["production"])
    say(
        f"speed package: published {DOMAIN} v{published['version']} (production) to {url} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return str(url)


def image_pool(data: Path, classes: list[str], size: int, out: Path) -> list[Path]:
    """~``size`` distinct readable photos spread over the classes; their paths written to ``out``."""
    root, found = photos(data, classes, max(1, size // len(classes) + 1), SPEED_FOLDER / "synthetic")
    per_class = max(1, -(-size // max(1, len(classes))))
    pool: list[Path] = []
    for depth in range(0, 10 * per_class, per_class):  # top up from deeper in each class if some are broken
        for name in classes:
            pool += readable(found[name][depth : depth + per_class])
        if len(pool) >= size:
            break
    pool = pool[:size]
    if not pool:
        raise RuntimeError(f"{root}: no readable photos for the load")
    out.write_text("\n".join(str(p.resolve()) for p in pool) + "\n")
    return pool


# --- the raw engine -------------------------------------------------------------------------------------


def raw_engine(
    package: Any, variant: str, pool: list[Path], batches: int, threads: int | None = None
) -> dict[str, Any]:
    """The served variant in ONNX Runtime in this process: batch-32 img/s (logits only, and with the
    heatmap output when the model has one, as the server runs it), batch-1 latency, decode cost."""
    import numpy as np

    from thali.core.inference import Preprocessor
    from thali.plugins.serving_onnxruntime import OnnxRuntimeBackend

    preprocessor = Preprocessor(package.preprocess)
    blobs = [p.read_bytes() for p in pool[:64]]
    preprocessor(blobs[0])  # the decoder's first call loads its plugins: not part of the cost
    started = time.perf_counter()
    inputs = np.stack([preprocessor(b) for b in blobs])
    decode_ms = 1000 * (time.perf_counter() - started) / len(blobs)
    batch = np.ascontiguousarray(np.concatenate([inputs] * (32 // len(inputs) + 1))[:32])
    backend = OnnxRuntimeBackend(package.model_path(variant), variant=variant, threads=threads)

    def throughput(run: Any) -> float:
        for _ in range(3):
            run(batch)
        began = time.perf_counter()
        for _ in range(batches):
            run(batch)
        return 32 * batches / (time.perf_counter() - began)

    result: dict[str, Any] = {
        "variant": variant,
        "file": backend.path.name,
        "provider": backend.provider_used,
    }
    result["b32_img_s"] = throughput(backend.predict)
    if backend.has_cam:
        result["b32_explain_img_s"] = throughput(backend.explain)
    single = batch[:1]
    for _ in range(5):
        backend.predict(single)
    took = []
    for _ in range(max(20, 2 * batches)):
        began = time.perf_counter()
        backend.predict(single)
        took.append(1000 * (time.perf_counter() - began))
    result["b1_p50_ms"] = statistics.median(took)
    result["b1_img_s"] = len(took) / (sum(took) / 1000)
    result["decode_preprocess_ms_per_image"] = decode_ms
    del backend
    return result


# --- one row: a server, a locust run ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    script = Path(sys.executable).parent / name
    if script.exists():
        return str(script)
    raise RuntimeError(f"{name} not found beside {sys.executable}; install it in this environment")


def get(url: str, timeout: float = 10.0) -> Any:
    import requests

    return requests.get(url, timeout=timeout, proxies=LOCAL)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    grpc: str = ""  # HOST:PORT of its gRPC server, if it runs one


def start_server(args: argparse.Namespace, registry: str, domain: str, spec: RowSpec, log: Path) -> Server:
    """``thali serve`` for one row; returns once /readyz answers 200 (at most 180 s)."""
    import requests

    port = free_port()
    grpc_port = free_port() if spec.mode == "grpc" else None
    command = [
        tool("thali"), "serve", "--registry", registry, "--domain", domain, "--port", str(port),
        "--workers", "1", "--threads", str(args.threads), "--variant", args.variant,
        "--max-batch-size", "32" if spec.batching else "1", "--max-wait-ms", f"{args.max_wait_ms:g}",
    ]  # fmt: skip
    if grpc_port:
        command += ["--grpc-port", str(grpc_port)]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "NO_PROXY": "127.0.0.1,localhost", **dict(spec.env)}
    if args.ort_threads:
        env["THALI_ORT_THREADS"] = str(args.ort_threads)
    handle = open(log, "wb")  # noqa: SIM115 - the server's own log; closed with the process
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    handle.close()
    server = Server(f"http://127.0.0.1:{port}", process, log, f"127.0.0.1:{grpc_port}" if grpc_port else "")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"thali serve exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            if get(server.url + "/readyz", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"thali serve was not ready within 180 s: {log.read_text()[-2000:]}")


def stop_server(server: Server) -> None:
    """SIGTERM to the server's process group (graceful), SIGKILL after 30 s."""
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


METRIC_LINE = re.compile(r"^(thali_[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$")


def scrape(url: str) -> dict[str, float]:
    """Sums of the ``_sum`` and ``_count`` series of /metrics (every label summed)."""
    totals: dict[str, float] = {}
    for line in get(url + "/metrics").text.splitlines():
        match = METRIC_LINE.match(line)
        if match and match[1].endswith(("_sum", "_count", "_total")):
            totals[match[1]] = totals.get(match[1], 0.0) + float(match[2])
    return totals


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def csv_rows(prefix: Path) -> dict[str, dict[str, str]]:
    path = prefix.with_name(prefix.name + "_stats.csv")
    with open(path, newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def run_row(
    args: argparse.Namespace, registry: str, domain: str, spec: RowSpec, pool_file: Path, out: Path
) -> dict[str, Any]:
    slug = spec.name.replace(" ", "_")
    server = start_server(args, registry, domain, spec, out / f"{slug}.server.log")
    try:
        before = scrape(server.url)
        prefix, samples = out / slug, out / f"{slug}.samples.json"
        warmup = max(32, 4 * spec.users)
        command = [
            tool("locust"), "-f", str(LOCUSTFILE), "--headless", "-u", str(spec.users), "-r", "1000",
            "-t", f"{args.row_time_cap}s", "--stop-timeout", "30", "--host", server.url,
            "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
            "--thali-domain", domain.partition("@")[0], "--thali-pool", str(pool_file),
            "--thali-mode", spec.mode, "--thali-requests", str(args.requests_per_row),
            "--thali-warmup", str(warmup), "--thali-out", str(samples),
            "--thali-server-pgid", str(server.process.pid),
            "--thali-preprocess", str(out / "preprocess.json"), "--thali-grpc", server.grpc,
        ]  # fmt: skip
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
        with open(out / f"{slug}.locust.log", "wb") as log:
            locust = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.row_time_cap + 120
            )
        if locust.returncode not in (0, 1):  # 1: some requests failed (counted below)
            raise RuntimeError(
                f"locust exited {locust.returncode}: {(out / f'{slug}.locust.log').read_text()[-2000:]}"
            )
        after = scrape(server.url)
    finally:
        stop_server(server)
    stats = csv_rows(prefix)
    measured, overall = stats.get("predict", {}), stats.get("Aggregated", {})
    data = json.loads(samples.read_text())
    wall = max(1e-9, float(data["wall_s"]))
    began, ended = data["cpu_began"], data["cpu_ended"]

    def delta(key: str) -> float:
        return float(ended.get(key, 0.0)) - float(began.get(key, 0.0))

    machine_total = max(1e-9, delta("machine_total_s"))
    timings = data["timings_ms"]
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = diff.get("thali_batch_size_count", 0.0)
    requests_measured = int(data["finished"])
    # locust writes its CSV every second; after a time cap the last second may be missing from it
    fresh = int(measured.get("Request Count") or 0) == requests_measured
    bad = int(data["bad_count"])
    return {
        "row": spec.name,
        "users": spec.users,
        "batching": spec.batching,
        "mode": spec.mode,
        "requests": requests_measured,
        "warmup_requests": int(overall.get("Request Count") or 0) - requests_measured,
        "errors": max(int(overall.get("Failure Count") or 0), bad),
        "req_s": len(data["client_ms"]) / wall if data["client_ms"] else 0.0,
        "csv_req_s_incl_warmup": float(measured.get("Requests/s") or 0.0),
        "p50_ms": float(measured.get("50%") or "nan") if fresh else percentile(data["client_ms"], 50),
        "p99_ms": float(measured.get("99%") or "nan") if fresh else percentile(data["client_ms"], 99),
        "latency_source": "locust CSV" if fresh else "locustfile samples (the CSV missed the last second)",
        "server_p50_ms": percentile(data["server_ms"], 50),
        "server_p99_ms": percentile(data["server_ms"], 99),
        "client_p50_ms_exact": percentile(data["client_ms"], 50),
        "client_p99_ms_exact": percentile(data["client_ms"], 99),
        "cached_answers": data["cached"],
        "answers": data["answers"],
        "wall_s": wall,
        "decode_p50_ms": percentile([t[0] for t in timings], 50),
        "queue_p50_ms": percentile([t[1] for t in timings], 50),
        "inference_p50_ms": percentile([t[2] for t in timings], 50),
        "mean_batch": diff.get("thali_batch_size_sum", 0.0) / batches if batches else None,
        "engine_s_incl_warmup": diff.get("thali_inference_seconds_sum", 0.0),
        "batches_incl_warmup": batches,
        "server_cores": delta("server_s") / wall,
        "locust_cores": delta("locust_s") / wall,
        "machine_busy_pct": 100 * delta("machine_busy_s") / machine_total,
        "bad": data["bad"],
        "locust_exit": locust.returncode,
        "time_capped": requests_measured < args.requests_per_row,
    }


# --- the report ----------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:,.{digits}f}"


def report(
    rows: dict[str, dict[str, Any]], raw: dict[str, Any], model_line: str, setup: str, wait_ms: float
) -> str:
    engine = raw["b32_img_s"]
    lines = [
        model_line,
        setup,
        "",
        "| row | concurrency | batching | requests | errors | req/s | p50 ms | p99 ms | server p50 ms "
        "| x unbatched (same concurrency) | % of raw engine b32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SHOWN:
        r = rows.get(name)
        if r is None:
            continue
        off = rows.get(f"unbatched c{r['users']}")
        ratio = r["req_s"] / off["req_s"] if off and off["req_s"] and r["batching"] else None
        batching = (f"on (32, {wait_ms:g} ms)" if r["batching"] else "off (1)") + (
            ", cache hit" if r["mode"] == "hit" else ""
        )
        lines.append(
            f"| {name} | {r['users']} | {batching} | {r['requests']:,} | {r['errors']} | {fmt(r['req_s'])} "
            f"| {fmt(r['p50_ms'], 0)} | {fmt(r['p99_ms'], 0)} | {fmt(r['server_p50_ms'], 2)} "
            f"| {fmt(ratio, 2) + 'x' if ratio else '-'} | {fmt(100 * r['req_s'] / engine, 0)} % |"
        )
    lines.append(
        f"| raw engine ({raw['variant']}, in process) | - | batch 32 | - | - | {fmt(engine)} img/s "
        "| - | - | - | - | 100 % |"
    )
    lines += ["", "Targets:", ""]
    lines += [
        f"- {t['text']}: **{'met' if t['met'] else 'not met'}** ({t['measured']})" for t in targets(rows, raw)
    ]
    lines += [
        "",
        "Where the time goes (medians per answer from the answers' timings_ms; mean batch from /metrics; "
        "CPU in cores over the measured phase):",
        "",
        "| row | decode+preprocess ms | queue ms | inference ms (its batch) | mean batch | server p50 ms "
        "| client p50 ms | server CPU cores | locust CPU cores | machine busy % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SHOWN:
        r = rows.get(name)
        if r is None:
            continue
        lines.append(
            f"| {name} | {fmt(r['decode_p50_ms'], 2)} | {fmt(r['queue_p50_ms'], 2)} "
            f"| {fmt(r['inference_p50_ms'], 2)} | {fmt(r['mean_batch'], 1)} | {fmt(r['server_p50_ms'], 2)} "
            f"| {fmt(r['client_p50_ms_exact'], 2)} | {fmt(r['server_cores'], 2)} "
            f"| {fmt(r['locust_cores'], 2)} | {fmt(r['machine_busy_pct'], 0)} |"
        )
    extra = (
        f", with the heatmap output as served: {fmt(raw['b32_explain_img_s'])} img/s"
        if "b32_explain_img_s" in raw
        else ""
    )
    lines += [
        "",
        f"Raw engine ({raw['variant']}, {raw['provider']}): batch 32 {fmt(engine)} img/s (logits only)"
        f"{extra}; batch 1 p50 {fmt(raw['b1_p50_ms'], 2)} ms ({fmt(raw['b1_img_s'])} img/s: batching can "
        f"buy at most {fmt(engine / raw['b1_img_s'], 2)}x in the engine); decode + preprocess "
        f"{fmt(raw['decode_preprocess_ms_per_image'], 2)} ms per photo in this process.",
    ]
    return "\n".join(lines)


def targets(rows: dict[str, dict[str, Any]], raw: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    on, off = rows.get("batched c32"), rows.get("unbatched c32")
    if on and off:
        ratio = on["req_s"] / off["req_s"] if off["req_s"] else float("inf")
        found.append(
            {
                "text": "concurrency 32: batching >= 2x unbatched throughput",
                "met": ratio >= 2.0,
                "measured": f"{ratio:.2f}x: {on['req_s']:.1f} vs {off['req_s']:.1f} req/s",
            }
        )
    if on:
        share = 100 * on["req_s"] / raw["b32_img_s"]
        found.append(
            {
                "text": "concurrency 32: batching >= 60 % of the raw engine's batch-32 throughput",
                "met": share >= 60,
                "measured": f"{share:.0f} %: {on['req_s']:.1f} of {raw['b32_img_s']:.1f} img/s",
            }
        )
    before, now = rows.get("before c1"), rows.get("batched c1")
    if before and now:
        found.append(
            {
                "text": "concurrency 1: server CPU <= 1.0 core for the same req/s as before",
                "met": now["server_cores"] <= 1.0 and now["req_s"] >= 0.95 * before["req_s"],
                "measured": f"{now['server_cores']:.2f} cores at {now['req_s']:.1f} req/s; before "
                f"(one engine batch at a time, spinning threads) {before['server_cores']:.2f} cores at "
                f"{before['req_s']:.1f} req/s",
            }
        )
    served = [r for r in rows.values() if r["batching"] and not r["row"].startswith("before")]
    if served:
        worst = max(served, key=lambda r: r["p99_ms"])
        unbatched = [r for r in rows.values() if not r["batching"]]
        note = ""
        if unbatched:
            w = max(unbatched, key=lambda r: r["p99_ms"])
            note = f"; batching off, for reference: up to {w['p99_ms']:.0f} ms ({w['row']})"
        found.append(
            {
                "text": "p99 <= 250 ms (every batching-on row, the served setting)",
                "met": worst["p99_ms"] <= 250,
                "measured": f"worst {worst['p99_ms']:.0f} ms ({worst['row']}){note}",
            }
        )
    hit = rows.get("cache hit c8")
    if hit:
        p50 = hit["server_p50_ms"]
        all_cached = hit["cached_answers"] == hit["answers"] and hit["answers"] > 0
        found.append(
            {
                "text": "cache hit <= 3 ms p50 server-side (every answer cached=true)",
                "met": p50 is not None and p50 <= 3 and all_cached,
                "measured": f"{fmt(p50, 2)} ms; {hit['cached_answers']:,} of {hit['answers']:,} "
                "answers cached",
            }
        )
    total = sum(r["requests"] for r in rows.values())
    errors = sum(r["errors"] for r in rows.values())
    misses = sum(r["cached_answers"] for r in rows.values() if r["mode"] == "miss")
    found.append(
        {
            "text": "0 errors in >= 10,000 requests",
            "met": errors == 0 and total >= 10_000,
            "measured": f"{errors} errors in {total:,} measured requests "
            f"(+{sum(r['warmup_requests'] for r in rows.values()):,} warm-up); "
            f"cache-miss rows answered from the cache: {misses}",
        }
    )
    return found


def arguments() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the defaults that depend on --quick filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("THALI_DATA", REPO.parent / "shared" / "datasets"))
    parser.add_argument("--registry", help="a registry URL holding --domain (default: the speed package)")
    parser.add_argument("--domain", help="NAME[@REF] in --registry (default ref: production, else latest)")
    parser.add_argument("--data", type=Path, default=default_data / DOMAIN, help="photos for the load")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--quick", action="store_true", help="smoke run: 150 requests a row, short caps")
    parser.add_argument("--requests-per-row", type=int, help="measured requests a row (default 1500)")
    parser.add_argument("--row-time-cap", type=int, help="seconds a row may run (default 600, quick 120)")
    parser.add_argument("--threads", type=int, default=32, help="gunicorn threads of the server")
    parser.add_argument("--variant", default="int8", help="served variant (default int8)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batch wait (default 5)")
    parser.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument(
        "--engine-batches", type=int, help="timed batch-32 runs of the raw engine (default 20)"
    )
    parser.add_argument("--rows", help="comma-separated subset of the rows (default: all)")
    args = parser.parse_args()
    if bool(args.registry) != bool(args.domain):
        parser.error("--registry and --domain go together")
    args.requests_per_row = args.requests_per_row or (150 if args.quick else 1500)
    args.row_time_cap = args.row_time_cap or (120 if args.quick else 600)
    args.engine_batches = args.engine_batches or (5 if args.quick else 20)
    return parser, args


@dataclass(frozen=True)
class Model:
    """The package under load: from --registry/--domain, or the speed-only package."""

    registry: str
    domain: str  # NAME[@REF], what the server is told to serve
    name: str
    package: Any
    speed_only: bool


def resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace, registries: Any) -> Model:
    from thali.registry import ModelRegistry

    if args.registry:
        registry, domain = args.registry, args.domain
        name, _, ref = domain.partition("@")
        speed_only = False
    else:
        registry, name, ref = build_speed_package(SPEED_FOLDER, args.data, registries), DOMAIN, ""
        domain, speed_only = f"{DOMAIN}@production", True
    models = ModelRegistry(registry)
    package = models.resolve(
        name, ref or ("production" if "production" in models.aliases(name) else "latest")
    )
    if args.variant not in package.variants:
        parser.error(
            f"{name} v{package.version} has no {args.variant} variant ({', '.join(package.variants)})"
        )
    return Model(registry, domain, name, package, speed_only)


def run_rows(
    args: argparse.Namespace, specs: list[RowSpec], model: Model, pool_file: Path, out: Path
) -> dict[str, dict[str, Any]]:
    """Every row in turn, each on its own server, with a line before and after it."""
    rows: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(specs, 1):
        say(f"[{i}/{len(specs)}] {spec.name}: {args.requests_per_row} requests, {spec.users} users ...")
        started = time.perf_counter()
        row = run_row(args, model.registry, model.domain, spec, pool_file, out)
        rows[spec.name] = row
        say(
            f"[{i}/{len(specs)}] {spec.name}: {row['requests']} requests, {row['errors']} errors, "
            f"{row['req_s']:.1f} req/s, p50 {fmt(row['p50_ms'], 0)} ms, p99 {fmt(row['p99_ms'], 0)} ms, "
            f"server p50 {fmt(row['server_p50_ms'], 2)} ms ({time.perf_counter() - started:.0f} s)"
            + ("  [time cap reached]" if row["time_capped"] else "")
        )
    return rows


def model_line(args: argparse.Namespace, model: Model) -> str:
    version = model.package.version
    if model.speed_only:
        return (
            f"Model: {DOMAIN} v{version} ({args.variant}) from {model.registry}: a SPEED-ONLY package, the "
            "pack's architecture and input size (tf_efficientnet_lite0 + SE head + coord attention, 224 px) "
            "with offline ImageNet backbone weights and a random head: its answers are meaningless."
        )
    return f"Model: {model.name} v{version} ({args.variant}) from {model.registry}."


def setup_line(args: argparse.Namespace) -> str:
    quick = "quick smoke run; " if args.quick else ""
    return (
        f"Setup: {os.cpu_count()} CPU cores shared by the server and locust; thali serve, 1 gunicorn worker, "
        f"{args.threads} threads, ONNX Runtime threads {args.ort_threads or 'default'}; locust FastHttpUser, "
        f"wait 0, {args.requests_per_row:,} measured requests a row after a warm-up; {quick}"
        "req/s = measured requests / wall time of the measured phase; p50/p99 from locust's CSV stats; "
        "server p50 from Server-Timing."
    )


def write_results(
    out: Path,
    args: argparse.Namespace,
    model: Model,
    raw: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    table: str,
) -> None:
    results = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "domain": model.name,
            "version": model.package.version,
            "variant": args.variant,
            "registry": model.registry,
            "speed_only": model.speed_only,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_cores": os.cpu_count(),
        "raw_engine": raw,
        "rows": list(rows.values()),
        "targets": targets(rows, raw),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")
    say(f"\nwritten: {out / 'results.json'}, {out / 'table.md'}")


def main() -> int:
    parser, args = arguments()
    specs = [
        s for s in ROWS if not args.rows or s.name.replace(" ", "_") in args.rows.replace(" ", "_").split(",")
    ]

    from thali.core import build_plugin_manager
    from thali.core.domains import resolve_domain

    registries = build_plugin_manager().registries
    out = args.out / f"api-load-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    model = resolve_model(parser, args, registries)
    classes = [c["name"] for c in model.package.labels.get("classes", [])]
    if model.speed_only or not classes:
        classes = resolve_domain(registries, DOMAIN).load_config([]).class_names
    (out / "preprocess.json").write_text(
        json.dumps(model.package.preprocess)
    )  # the v2 fp32 rows prepare with it
    pool_file = out / "pool.txt"
    pool = image_pool(args.data, classes, POOL_SIZE, pool_file)
    say(f"load: {len(pool)} distinct photos ({pool[0].parent.parent})")

    say(f"raw engine: {args.variant} at batch 32, {args.engine_batches} timed batches after 3 warm-up ...")
    raw = raw_engine(model.package, args.variant, pool, args.engine_batches, args.ort_threads)
    say(f"raw engine: {raw['b32_img_s']:.1f} img/s at batch 32; batch 1 p50 {raw['b1_p50_ms']:.2f} ms")

    rows = run_rows(args, specs, model, pool_file, out)
    table = report(rows, raw, model_line(args, model), setup_line(args), args.max_wait_ms)
    say("")
    say(table)
    write_results(out, args, model, raw, rows, table)
    return 0


if __name__ == "__main__":
    from thali.core.errors import ThaliError

    try:
        sys.exit(main())
    except ThaliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # a server or locust that failed or hung
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
