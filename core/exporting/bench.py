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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from thali.core.errors import DataError
from thali.core.export import LOGITS
from thali.core.inference.providers import PREFERRED_PROVIDERS, SHORT
from thali.core.manifest import default_run_folder

NO_EXTRAS: frozenset[str] = frozenset()  # outputs asked for besides logits


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

    def run(x: np.ndarray) -> np.ndarray:  # logits only, through the call the server makes
        return backend.run(x, NO_EXTRAS)[LOGITS]

    return Row(label, "onnxruntime", variant, provider, run, path.stat().st_size, placement)


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _run_folder(model_dir: Path, meta: dict[str, Any]) -> Path:
    """The export's training run (its validation split; its checkpoint for the torch eager rows).

    ``export.json`` names the run by folder name and checkpoint hash only (``lineage.run_id``,
    ``lineage.checkpoint_sha256``), so it is looked for where ``thali train`` and ``thali export`` put
    them: the export's own parent (``RUN_DIR/export``), beside the export, then
    ``$THALI_RUNS/DOMAIN/RUN_ID`` or ``runs/DOMAIN/RUN_ID``; the first whose ``best.pt`` has the recorded
    hash, else the first that holds a ``split.json``. ``thali bench --run RUN`` names it instead."""
    from .pipeline import sha256

    lineage = meta.get("lineage") or {}
    run_id = str(lineage.get("run_id") or "")
    default = default_run_folder(str(meta.get("domain")), run_id)
    if default is None:
        return Path("runs") / "(no run id in export.json)"  # not there: bench says the run is gone
    parent = model_dir.resolve().parent
    candidates = [*([parent] if parent.name == run_id else []), parent / run_id, default]
    with_split = [c for c in candidates if (c / "split.json").is_file()]
    expected = lineage.get("checkpoint_sha256")
    for candidate in with_split:
        if (candidate / "best.pt").is_file() and sha256(candidate / "best.pt") == expected:
            return candidate
    return with_split[0] if with_split else candidates[-1]


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


@dataclass(frozen=True)
class BenchRow:
    """One row of the result: what ``bench.json`` lists under ``rows`` and :func:`markdown` prints."""

    name: str
    engine: str
    variant: str
    provider_requested: str
    nodes_by_provider: dict[str, int]
    file_mb: float | None
    latency_ms_p50: float
    latency_ms_p95: float
    throughput_img_s: float
    top1: float | None
    x_torch_eager: float | None  # throughput against plain torch eager on the CPU
    x_ort_fp32: float | None  # throughput against ONNX Runtime fp32 on the same provider
    # only for rows whose node placement was read (ONNX Runtime)
    provider_used: str | None = None
    fell_back_to_cpu: bool | None = None
    # only when this row and its ONNX Runtime fp32 reference both have a top-1
    top1_drop_vs_fp32: float | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("provider_used", "fell_back_to_cpu", "top1_drop_vs_fp32")

    @classmethod
    def of(cls, row: Row, batch: int, torch_cpu: Row | None, ref: Row | None) -> BenchRow:
        """The measured ``row``, with its ratios against ``torch_cpu`` and ``ref`` (ORT fp32)."""
        placed = row.nodes_by_provider
        used = max(placed, key=lambda p: placed[p]) if placed else None
        return cls(
            name=row.name,
            engine=row.engine,
            variant=row.variant,
            provider_requested=row.provider,
            nodes_by_provider=placed,
            file_mb=round(row.file_bytes / 1e6, 2) if row.file_bytes else None,
            latency_ms_p50=round(1000 * _percentile(row.latency, 50), 2),
            latency_ms_p95=round(1000 * _percentile(row.latency, 95), 2),
            throughput_img_s=round(_throughput(row, batch), 1),
            top1=round(row.top1, 4) if row.top1 is not None else None,
            x_torch_eager=_ratio(row, torch_cpu, batch),
            x_ort_fp32=_ratio(row, ref, batch),
            provider_used=used,
            fell_back_to_cpu=(
                row.provider != "CPUExecutionProvider" and bool(placed.get("CPUExecutionProvider"))
                if placed
                else None
            ),
            top1_drop_vs_fp32=_top1_drop(row, ref),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON row: the optional keys only where they apply."""
        entry = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in self.OPTIONAL:
            if entry[key] is None:
                del entry[key]
        return entry


def _throughput(row: Row, batch: int) -> float:
    return batch / float(np.median(row.batch_times))


def _top1_drop(row: Row, ref: Row | None) -> float | None:
    """Top-1 points lost against ONNX Runtime fp32 on the same provider (``None`` if either has none)."""
    if ref is None or ref.top1 is None or row.top1 is None:
        return None
    return round(100 * (ref.top1 - row.top1), 2)


def _ratio(row: Row, reference: Row | None, batch: int) -> float | None:
    return round(_throughput(row, batch) / _throughput(reference, batch), 2) if reference else None


@dataclass(frozen=True)
class _Input:
    """What every row runs on: the images (validation, or random with ``synthetic``), their labels
    (``None``: synthetic, no top-1), one batch of ``batch`` and a single image."""

    images: np.ndarray
    labels: np.ndarray | None
    batch: np.ndarray
    single: np.ndarray


def _bench_input(
    run_dir: Path,
    preprocess: dict[str, Any],
    data: str | Path | None,
    batch: int,
    limit: int | None,
    synthetic: bool,
) -> _Input:
    from thali.core.inference.preprocess import Preprocessor

    from .data import load_validation, run_split

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
    return _Input(images, labels, batch_input, images[:1])


def _providers(requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``(providers to run, notes)``: the requested (default: preferred) providers this onnxruntime
    build has, and a note for each it lacks."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* pip packages (what torch uses), before any session
            ort.preload_dlls()
        except Exception as exc:  # the session will say what is missing; keep the reason
            print(f"note: onnxruntime.preload_dlls failed: {exc}")
    wanted = [p for p in (requested or PREFERRED_PROVIDERS) if p in available]
    missing = [p for p in (requested or PREFERRED_PROVIDERS) if p not in available]
    return wanted, [f"{p} is not available in this onnxruntime build" for p in missing]


def _torch_rows(run_dir: Path, meta: dict[str, Any], registries: Any, notes: list[str]) -> list[Row]:
    """Torch eager rows from the run's checkpoint (plain and channels_last on the CPU, CUDA when
    there is one); none, with a note, without torch or without that very checkpoint."""
    from .pipeline import sha256

    if not _has_torch():
        notes.append("torch eager skipped: torch is not installed (pip install 'thali[train]')")
        return []
    checkpoint = run_dir / "best.pt"
    if not checkpoint.is_file():
        notes.append(f"torch eager skipped: {run_dir}/best.pt is gone")
        return []
    if sha256(checkpoint) != meta["lineage"].get("checkpoint_sha256"):
        notes.append(f"torch eager skipped: {checkpoint} is not the checkpoint this export was made from")
        return []
    import copy

    import torch

    from thali.core.training.evaluate import load_run

    model = load_run(run_dir, registries).model
    rows = [_torch_row(model, "cpu"), _torch_row(copy.deepcopy(model), "cpu", channels_last=True)]
    if torch.cuda.is_available():
        rows.append(_torch_row(copy.deepcopy(model), "cuda"))
    return rows


def _build_rows(
    model_dir: Path,
    run_dir: Path,
    meta: dict[str, Any],
    registries: Any,
    *,
    variants: Sequence[str],
    providers: Sequence[str],
    torch_eager: bool,
    notes: list[str],
    progress: bool,
) -> list[Row]:
    """The torch eager rows, then one per variant and provider (a session that fails is a note)."""
    from tqdm import tqdm

    from thali.core.export import variant_file

    rows: list[Row] = []
    setup = tqdm(desc="bench: loading", total=len(variants) * len(providers) + 1, disable=not progress)
    if torch_eager:
        rows += _torch_rows(run_dir, meta, registries, notes)
    setup.update()
    for variant in variants:
        for provider in providers:
            try:
                rows.append(_onnx_row(registries, model_dir / variant_file(variant), variant, provider))
            except Exception as exc:  # a provider that cannot build this model: say so, keep going
                notes.append(f"{variant} on {provider}: session failed: {str(exc).splitlines()[0][:200]}")
            setup.update()
    setup.close()
    return rows


def _time_rows(
    rows: Sequence[Row], sample: _Input, latency_runs: int, throughput_runs: int, tick: Callable[[], object]
) -> None:
    """Warm every row up, then time batch-1 latency and batch throughput, interleaved across rows."""
    for row in rows:  # warm-up: first runs allocate, pack weights, pick kernels
        for x in (sample.single, sample.batch, sample.single):
            row.run(x)
            tick()
    # Interleaved in blocks: every row is timed in every round, so drift on a noisy machine hits all
    # rows alike; the pause before each block lets the previous row's spinning threads go idle.
    rounds = max(1, min(5, throughput_runs))
    for r in range(rounds):
        for row in rows:
            time.sleep(0.05)
            row.run(sample.single)
            for _ in range(latency_runs // rounds + (r < latency_runs % rounds)):
                start = time.perf_counter()
                row.run(sample.single)
                row.latency.append(time.perf_counter() - start)
                tick()
            for _ in range(throughput_runs // rounds + (r < throughput_runs % rounds)):
                start = time.perf_counter()
                row.run(sample.batch)
                row.batch_times.append(time.perf_counter() - start)
                tick()


def _score_rows(rows: Sequence[Row], sample: _Input, batch: int, tick: Callable[[], object]) -> None:
    """Top-1 of every row on the validation images (none on synthetic input)."""
    from thali.core.metrics import topk_accuracy

    images, labels = sample.images, sample.labels
    for row in rows:
        if labels is not None:
            logits = np.concatenate([row.run(images[i : i + batch]) for i in range(0, len(images), batch)])
            row.top1 = topk_accuracy(logits, labels, 1)
        tick()


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
    run: str | Path | None = None,
) -> dict[str, Any]:
    """Benchmark the export in ``model_dir``; returns the JSON-ready result (see :func:`markdown`).

    Phases: the export's report and preprocess spec; the input; the rows (torch eager, then every
    variant on every provider); warm-up and interleaved timing; top-1; the result."""
    from tqdm import tqdm

    from thali.core.export import read_export_report, variant_file

    model_dir = Path(model_dir)
    meta = read_export_report(model_dir)  # the shape checked: names, file names, recorded sha256s
    run_dir = Path(run) if run is not None else _run_folder(model_dir, meta)
    preprocess = _verified_json(model_dir, "preprocess.json", meta["files"]["preprocess.json"])
    sample = _bench_input(run_dir, preprocess, data, batch, limit, synthetic)
    wanted, notes = _providers(providers)
    if synthetic:
        notes.append("synthetic input: timings only, no top-1")
    variants = [v for v in meta["variants"] if (model_dir / variant_file(v)).is_file()]
    rows = _build_rows(
        model_dir,
        run_dir,
        meta,
        registries,
        variants=variants,
        providers=wanted,
        torch_eager=torch_eager,
        notes=notes,
        progress=progress,
    )
    total = len(rows) * (3 + latency_runs + throughput_runs + 1)
    with tqdm(desc="bench: timing", total=total, disable=not progress) as bar:
        _time_rows(rows, sample, latency_runs, throughput_runs, bar.update)
        _score_rows(rows, sample, batch, bar.update)
    scored = 0 if sample.labels is None else len(sample.labels)
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

    torch_cpu = next((r for r in rows if r.engine == "torch" and r.name == "torch eager fp32 (cpu)"), None)
    fp32_by_provider = {r.provider: r for r in rows if r.engine == "onnxruntime" and r.variant == "fp32"}
    out_rows = [
        BenchRow.of(
            row, batch, torch_cpu, fp32_by_provider.get(row.provider) if row.engine == "onnxruntime" else None
        ).to_dict()
        for row in rows
    ]
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
