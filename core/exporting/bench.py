"""``thali bench MODEL``: torch eager fp32 and every ONNX variant of an export, side by side in one run.

Per row: latency p50/p95 at batch 1, throughput at batch ``batch``, file size, top-1 on the run's
validation split, and the execution provider that really ran the nodes (read from ONNX Runtime's
profiler, because a session asked for CUDA silently falls back to CPU for what CUDA cannot run).
Timings are interleaved round-robin across rows, so a noisy machine slows every row alike; ratios
are against torch eager and against ONNX Runtime fp32 on the same provider.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thali.core.errors import DataError
from thali.core.inference.providers import PREFERRED_PROVIDERS, SHORT


@dataclass
class Row:
    name: str  # "torch eager fp32", "onnxruntime int8", ...
    engine: str  # torch | onnxruntime
    variant: str
    provider: str
    run: Callable[[np.ndarray], np.ndarray]
    file_bytes: int | None = None
    nodes_by_provider: dict[str, int] = field(default_factory=dict)
    latency: list[float] = field(default_factory=list)
    batch_times: list[float] = field(default_factory=list)
    top1: float | None = None


def _torch_row(model: Any, device: str, channels_last: bool = False) -> Row:
    """Plain eager (NCHW, what ``model(x)`` does) or channels_last, torch's own CPU speed-up (the trainer
    uses it): measured here at batch 32 it is up to 1.7x plain eager, so both are shown."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(device, memory_format=fmt)).float().cpu().numpy()

    name = f"torch eager fp32{' channels_last' if channels_last else ''} ({device})"
    return Row(name, "torch", "fp32", device, run)


def _onnx_row(registries: Any, path: Path, variant: str, provider: str) -> Row:
    """One row per variant and provider, built through the ``onnxruntime`` serving backend, so bench
    times what the server runs: its session profiles its first run to read which provider ran each node,
    then stops profiling, so the timed runs that follow are not slowed."""
    from thali.core.inference import load_backend

    backend = load_backend(
        registries, "onnxruntime", path, provider=provider, variant=variant, spinning=True
    )  # the engine at full speed, as the raw-engine rows of every benchmark measure it
    placement = dict(backend.info().get("nodes_by_provider") or {})
    label = f"onnxruntime {variant} ({SHORT.get(provider, provider)})"
    return Row(label, "onnxruntime", variant, provider, backend.predict, path.stat().st_size, placement)


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _verified_json(folder: Path, name: str, expected: str) -> dict[str, Any]:
    """A metadata file of an export, checked against the sha256 ``export.json`` recorded for it."""
    from thali.core.files import read_bounded

    data = read_bounded(folder / name, 16 * 1024 * 1024, name)
    if hashlib.sha256(data).hexdigest() != expected:
        raise DataError(f"{folder / name}: not the file `thali export` wrote (sha256 changed); export again")
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise DataError(f"{folder / name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict) or "input_size" not in value:
        raise DataError(f"{folder / name}: not a preprocess spec")
    return value


def bench_model(
    model_dir: Path,
    registries: Any,
    *,
    data: str | Path | None = None,
    batch: int = 32,
    latency_runs: int = 50,
    throughput_runs: int = 5,
    providers: Sequence[str] | None = None,
    torch_eager: bool = True,
    limit: int | None = None,
    synthetic: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark the export in ``model_dir``; returns the JSON-ready result (see :func:`markdown`)."""
    import onnxruntime as ort
    from tqdm import tqdm

    from thali.core.export import read_export_report, variant_file
    from thali.core.inference.preprocess import Preprocessor
    from thali.core.training.metrics import topk_accuracy

    from .data import load_validation, run_split
    from .pipeline import sha256

    model_dir = Path(model_dir)
    meta = read_export_report(model_dir)  # the shape checked: names, file names, recorded sha256s
    run_dir = Path(str(meta.get("lineage", {}).get("run", "")))
    preprocess = _verified_json(model_dir, "preprocess.json", meta["files"]["preprocess.json"])
    labels: np.ndarray | None = None
    if synthetic:
        rng = np.random.default_rng(0)
        images = rng.standard_normal((max(batch, 8), *preprocess["input_size"])).astype(np.float32)
    else:
        if not (run_dir / "split.json").is_file():
            raise DataError(
                f"{run_dir}: the training run of this export is gone, and with it the validation split; "
                "pass --synthetic to time on random input without top-1"
            )
        # the server's own preprocessing (OpenCV + numpy), so bench needs neither torch nor albumentations
        val = load_validation(run_split(run_dir, data)[0], Preprocessor(preprocess))
        images, labels = val.images[:limit], val.labels[:limit]
    if len(images) < batch:
        reps = -(-batch // len(images))
        batch_input = np.concatenate([images] * reps)[:batch]
    else:
        batch_input = images[:batch]
    single = images[:1]

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* pip packages (what torch uses), before any session
            ort.preload_dlls()
        except Exception as exc:  # the session will say what is missing; keep the reason
            print(f"note: onnxruntime.preload_dlls failed: {exc}")
    wanted = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
    missing = [p for p in (providers or PREFERRED_PROVIDERS) if p not in available]
    variants = [v for v in meta["variants"] if (model_dir / variant_file(v)).is_file()]

    rows: list[Row] = []
    notes: list[str] = [f"{p} is not available in this onnxruntime build" for p in missing]
    if synthetic:
        notes.append("synthetic input: timings only, no top-1")
    setup = tqdm(desc="bench: loading", total=len(variants) * len(wanted) + 1, disable=not progress)
    if torch_eager and not _has_torch():
        notes.append("torch eager skipped: torch is not installed (pip install 'thali[train]')")
    elif torch_eager:
        checkpoint = run_dir / "best.pt"
        if checkpoint.is_file() and sha256(checkpoint) != meta["lineage"].get("checkpoint_sha256"):
            notes.append(f"torch eager skipped: {checkpoint} is not the checkpoint this export was made from")
        elif checkpoint.is_file():
            import copy

            import torch

            from thali.core.training.evaluate import load_run

            model = load_run(run_dir, registries).model
            rows.append(_torch_row(model, "cpu"))
            rows.append(_torch_row(copy.deepcopy(model), "cpu", channels_last=True))
            if torch.cuda.is_available():
                rows.append(_torch_row(copy.deepcopy(model), "cuda"))
        else:
            notes.append(f"torch eager skipped: {run_dir}/best.pt is gone")
    setup.update()
    for variant in variants:
        for provider in wanted:
            try:
                rows.append(_onnx_row(registries, model_dir / variant_file(variant), variant, provider))
            except Exception as exc:  # a provider that cannot build this model: say so, keep going
                notes.append(f"{variant} on {provider}: session failed: {str(exc).splitlines()[0][:200]}")
            setup.update()
    setup.close()

    total = len(rows) * (3 + latency_runs + throughput_runs + 1)
    bar = tqdm(desc="bench: timing", total=total, disable=not progress)
    for row in rows:  # warm-up: first runs allocate, pack weights, pick kernels
        for x in (single, batch_input, single):
            row.run(x)
            bar.update()
    # Interleaved in blocks: every row is timed in every round, so drift on a noisy machine hits all
    # rows alike; the pause before each block lets the previous row's spinning threads go idle.
    rounds = max(1, min(5, throughput_runs))
    for r in range(rounds):
        for row in rows:
            time.sleep(0.05)
            row.run(single)
            for _ in range(latency_runs // rounds + (r < latency_runs % rounds)):
                start = time.perf_counter()
                row.run(single)
                row.latency.append(time.perf_counter() - start)
                bar.update()
            for _ in range(throughput_runs // rounds + (r < throughput_runs % rounds)):
                start = time.perf_counter()
                row.run(batch_input)
                row.batch_times.append(time.perf_counter() - start)
                bar.update()
    for row in rows:
        if labels is not None:
            logits = np.concatenate([row.run(images[i : i + batch]) for i in range(0, len(images), batch)])
            row.top1 = topk_accuracy(logits, labels, 1)
        bar.update()
    bar.close()
    scored = 0 if labels is None else len(labels)
    return _result(model_dir, meta, rows, notes, batch, scored, latency_runs, throughput_runs)


def _result(
    model_dir: Path,
    meta: dict[str, Any],
    rows: list[Row],
    notes: list[str],
    batch: int,
    val_images: int,
    latency_runs: int,
    throughput_runs: int,
) -> dict[str, Any]:
    import platform

    import onnxruntime as ort

    def throughput(row: Row) -> float:
        return batch / float(np.median(row.batch_times))

    torch_cpu = next((r for r in rows if r.engine == "torch" and r.name == "torch eager fp32 (cpu)"), None)
    fp32_by_provider = {r.provider: r for r in rows if r.engine == "onnxruntime" and r.variant == "fp32"}
    out_rows = []
    for row in rows:
        ref = fp32_by_provider.get(row.provider) if row.engine == "onnxruntime" else None
        entry: dict[str, Any] = {
            "name": row.name,
            "engine": row.engine,
            "variant": row.variant,
            "provider_requested": row.provider,
            "nodes_by_provider": row.nodes_by_provider,
            "file_mb": round(row.file_bytes / 1e6, 2) if row.file_bytes else None,
            "latency_ms_p50": round(1000 * _percentile(row.latency, 50), 2),
            "latency_ms_p95": round(1000 * _percentile(row.latency, 95), 2),
            "throughput_img_s": round(throughput(row), 1),
            "top1": round(row.top1, 4) if row.top1 is not None else None,
            "x_torch_eager": round(throughput(row) / throughput(torch_cpu), 2) if torch_cpu else None,
            "x_ort_fp32": round(throughput(row) / throughput(ref), 2) if ref else None,
        }
        if row.nodes_by_provider:
            entry["provider_used"] = max(row.nodes_by_provider, key=row.nodes_by_provider.get)
            entry["fell_back_to_cpu"] = row.provider != "CPUExecutionProvider" and bool(
                row.nodes_by_provider.get("CPUExecutionProvider")
            )
        if ref is not None and ref.top1 is not None and row.top1 is not None:
            entry["top1_drop_vs_fp32"] = round(100 * (ref.top1 - row.top1), 2)
        out_rows.append(entry)
    return {
        "model": str(model_dir),
        "domain": meta.get("domain"),
        "batch": batch,
        "validation_images": val_images,
        "latency_runs": latency_runs,
        "throughput_runs": throughput_runs,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers(),
        },
        "rows": out_rows,
        "notes": notes,
    }


def markdown(result: dict[str, Any]) -> str:
    """The bench result as a markdown table with ratios."""
    lines = [
        f"**{result['domain']}** — "
        + (
            f"{result['validation_images']} validation images"
            if result["validation_images"]
            else "synthetic input"
        )
        + f", batch {result['batch']}, "
        f"{result['machine']['cpu_count']} CPU cores, onnxruntime {result['machine']['onnxruntime']}",
        "",
        "| engine | ran on (nodes) | file MB | p50 ms (b1) | p95 ms (b1) | img/s (b"
        f"{result['batch']}) | x torch eager | x ORT fp32 | top-1 | Δ top-1 vs fp32 (pts) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: Any, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    for r in result["rows"]:
        placed = (
            ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in r["nodes_by_provider"].items())
            or r["provider_requested"]
        )
        top1 = fmt(None if r["top1"] is None else 100 * r["top1"], ".1f")
        lines.append(
            f"| {r['name']} | {placed} | {fmt(r['file_mb'])} | {r['latency_ms_p50']:.1f} | "
            f"{r['latency_ms_p95']:.1f} | {r['throughput_img_s']:.0f} | {fmt(r['x_torch_eager'], '.2f')} | "
            f"{fmt(r['x_ort_fp32'], '.2f')} | {top1} | {fmt(r.get('top1_drop_vs_fp32'), '.2f')} |"
        )
    lines.append("\nx torch eager: against plain torch eager on the CPU (NCHW, `model(x)`).")
    lines += [f"\nnote: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write_bench(result: dict[str, Any], out: Path) -> str:
    """Write ``bench.json`` and ``bench.md`` into ``out``; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "bench.md").write_text(table)
    return table
