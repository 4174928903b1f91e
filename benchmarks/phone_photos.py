"""Phone photos through thali, before and after issue 27, side by side in one run.

    python benchmarks/phone_photos.py [--registry models --domain south_asian_food] [--per-class 8]
                                      [--requests 300] [--data DIR] [--out runs/bench]

1. Decode + preprocess per photo (median of repeats, one thread) for a 12 MP JPEG (4032 x 3024, a
   shared photo upscaled with sensor-like noise, quality 92), the same frame as HEIC, and a 400 px web
   photo: *today's path* (before this issue: the whole frame decoded, then one resize with the model's
   interpolation, no antialiasing; HEIC was refused with a 415) next to the new one
   (``Preprocessor``: JPEG DCT-scaled decode, averaging resize past a 2x shrink).
2. ``thali serve`` of the bundled model (gunicorn, 127.0.0.1) under locust at concurrency 1 and 8,
   posting 12 MP JPEGs with unique bytes (no cache hits): p50, p99, req/s.
3. Top-1 of the bundled model (its served variant, ONNX Runtime) on shared validation photos
   (``--per-class`` of each class, the domain's own split), upscaled to 12 MP with noise and saved as
   JPEG, through today's path and the new one, and on the original photos.

Writes runs/bench/phone-photos-<time>/results.json and table.md. Timings on a shared machine are noisy:
compare rows of one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import api_load  # the server and locust rows, shared

REPO = Path(__file__).resolve().parents[1]
PHONE = (4032, 3024)


def say(text: str) -> None:
    print(text, flush=True)


def old_path(preprocessor: Any) -> Any:
    """Today's path before this issue: full-size decode, one resize with the model's interpolation."""
    import cv2

    from thali.core.images import decode_rgb

    def run(data: bytes) -> np.ndarray:
        rgb = decode_rgb(data, preprocessor.limits)
        h, w = rgb.shape[:2]
        scale = preprocessor.shorter / float(min(h, w))
        if scale != 1.0:
            rgb = cv2.resize(
                rgb,
                (max(1, round(w * scale)), max(1, round(h * scale))),
                interpolation=preprocessor.interpolation,
            )
        h, w = rgb.shape[:2]
        top, left = (h - preprocessor.height) // 2, (w - preprocessor.width) // 2
        crop = np.ascontiguousarray(rgb[top : top + preprocessor.height, left : left + preprocessor.width])
        return preprocessor.normalise(crop)

    return run


def phone_frame(path: Path, seed: int) -> Any:
    """A shared photo upscaled to 4032 px wide (bicubic) with sensor-like noise (sd 4 levels)."""
    import cv2
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    height = round(PHONE[0] * rgb.shape[0] / rgb.shape[1])
    big = cv2.resize(rgb, (PHONE[0], height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    big += np.random.default_rng(seed).normal(0, 4, big.shape).astype(np.float32)
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def encode(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def timed(run: Any, data: bytes, repeats: int) -> float | None:
    """Median milliseconds of ``run(data)``; None when it refuses the image (a 4xx for a server)."""
    from thali.core.errors import DataError

    try:
        run(data)
    except DataError:
        return None
    took = []
    for _ in range(repeats):
        began = time.perf_counter()
        run(data)
        took.append(1000 * (time.perf_counter() - began))
    return statistics.median(took)


def decode_rows(package: Any, web_photo: Path, repeats: int) -> list[dict[str, Any]]:
    from PIL import Image

    from thali.core.images import accepted_formats
    from thali.core.inference import Preprocessor

    new = Preprocessor(package.preprocess)
    old = old_path(new)
    accepted_formats()  # registers the HEIC decoder (and encoder) with Pillow
    frame = phone_frame(web_photo, 0)
    with Image.open(web_photo) as img:
        web_size = img.size
    samples = {
        f"12 MP JPEG ({PHONE[0]} x {frame.size[1]}, q92)": encode(frame, "JPEG", quality=92),
        f"12 MP HEIC ({PHONE[0]} x {frame.size[1]}, q80)": encode(frame, "HEIF", quality=80),
        f"web JPEG ({web_size[0]} x {web_size[1]})": web_photo.read_bytes(),
    }
    rows = []
    for name, data in samples.items():
        before = None if "HEIC" in name else timed(old, data, repeats)  # HEIC: a 415 before
        after = timed(new, data, repeats)
        rows.append(
            {
                "photo": name,
                "bytes": len(data),
                "before_ms": before,
                "after_ms": after,
                "speedup": before / after if before and after else None,
            }
        )
        say(f"decode: {name}: before {before} ms, after {after} ms")
    return rows


def validation_photos(registries: Any, domain: str, data: Path, per_class: int) -> list[tuple[Path, int]]:
    from thali.core.domains import resolve_domain
    from thali.core.training.data import make_split

    config = resolve_domain(registries, domain).load_config()
    samples = registries.datasets.create("imagefolder", data, classes=config.class_names).samples
    split, _ = make_split(config, data, samples)
    picked: dict[int, list[tuple[Path, int]]] = {}
    for path, label in split.val:
        if len(picked.setdefault(label, [])) < per_class:
            picked[label].append((Path(path), label))
    return [item for items in picked.values() for item in items]


def accuracy_rows(package: Any, variant: str, photos: list[tuple[Path, int]]) -> dict[str, Any]:
    import onnxruntime as ort

    from thali.core.errors import DataError
    from thali.core.inference import Preprocessor

    new = Preprocessor(package.preprocess)
    old = old_path(new)
    session = ort.InferenceSession(str(package.model_path(variant)), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    inputs: dict[str, list[np.ndarray]] = {"original": [], "12 MP, today's path": [], "12 MP, new path": []}
    labels = []
    began = time.perf_counter()
    for i, (path, label) in enumerate(photos):
        try:
            original = new(path.read_bytes())
            phone = encode(phone_frame(path, i), "JPEG", quality=92)
        except (DataError, OSError):
            continue
        inputs["original"].append(original)
        inputs["12 MP, today's path"].append(old(phone))
        inputs["12 MP, new path"].append(new(phone))
        labels.append(label)
        if (i + 1) % 50 == 0:
            say(f"accuracy: {i + 1} of {len(photos)} photos ({time.perf_counter() - began:.0f} s)")
    truth = np.array(labels)
    result: dict[str, Any] = {"photos": len(labels), "classes": len(set(labels))}
    for key, tensors in inputs.items():
        predicted = np.concatenate(
            [
                session.run(None, {name: np.stack(tensors[i : i + 16])})[0].argmax(1)
                for i in range(0, len(tensors), 16)
            ]
        )
        result[key] = float((predicted == truth).mean())
    return result


def server_rows(args: argparse.Namespace, photos: list[tuple[Path, int]], out: Path) -> list[dict[str, Any]]:
    folder = out / "phone-jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (path, _) in enumerate(photos[: args.pool]):
        target = folder / f"phone_{i:03d}.jpg"
        target.write_bytes(encode(phone_frame(path, 100 + i), "JPEG", quality=92))
        paths.append(target)
    pool_file = out / "phone-pool.txt"
    pool_file.write_text("\n".join(str(p) for p in paths) + "\n")
    load = argparse.Namespace(
        threads=32,
        variant=args.variant,
        max_wait_ms=5.0,
        ort_threads=None,
        row_time_cap=300,
        requests_per_row=args.requests,
    )
    rows = []
    for users in (1, 8):
        spec = api_load.RowSpec(f"12 MP c{users}", users, True, "miss")
        say(f"server: 12 MP JPEGs at concurrency {users}, {args.requests} requests ...")
        row = api_load.run_row(load, args.registry, args.domain, spec, pool_file, out)
        rows.append(row)
        say(
            f"server: c{users}: {row['req_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, "
            f"p99 {row['p99_ms']:.0f} ms, decode p50 {row['decode_p50_ms']:.1f} ms, {row['errors']} errors"
        )
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(
    decode: list[dict[str, Any]], served: list[dict[str, Any]], top1: dict[str, Any], model: str
) -> str:
    lines = [
        model,
        "",
        "Decode + preprocess per photo (median, one thread):",
        "",
        "| photo | bytes | today's path ms | new path ms | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in decode:
        before = fmt(r["before_ms"]) if r["before_ms"] is not None else "refused (415)"
        speedup = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        lines.append(f"| {r['photo']} | {r['bytes']:,} | {before} | {fmt(r['after_ms'])} | {speedup} |")
    lines += [
        "",
        "The server (thali serve, 1 gunicorn worker, 32 threads, 12 MP JPEGs with unique bytes):",
        "",
        "| concurrency | requests | errors | req/s | p50 ms | p99 ms | server decode p50 ms "
        "| server CPU cores |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in served:
        lines.append(
            f"| {r['users']} | {r['requests']:,} | {r['errors']} | {fmt(r['req_s'])} | {fmt(r['p50_ms'], 0)} "
            f"| {fmt(r['p99_ms'], 0)} | {fmt(r['decode_p50_ms'])} | {fmt(r['server_cores'], 2)} |"
        )
    lines += [
        "",
        f"Top-1 of the served model on {top1['photos']} validation photos ({top1['classes']} classes):",
        "",
        "| input | top-1 |",
        "|---|---:|",
    ]
    for key in ("original", "12 MP, today's path", "12 MP, new path"):
        lines.append(f"| {key} | {100 * top1[key]:.1f} % |")
    jpeg = decode[0]
    c1 = next((r for r in served if r["users"] == 1), None)
    gap = 100 * (top1["original"] - top1["12 MP, new path"])
    lines += [
        "",
        "Targets:",
        "",
        "- 12 MP decode + preprocess >= 4x faster: "
        f"**{'met' if (jpeg['speedup'] or 0) >= 4 else 'not met'}** ({fmt(jpeg['speedup'], 1)}x)",
    ]
    if c1:
        lines.append(
            f"- a 12 MP photo answered in <= 80 ms p50 at concurrency 1: "
            f"**{'met' if c1['p50_ms'] <= 80 else 'not met'}** ({c1['p50_ms']:.0f} ms)"
        )
    lines.append(
        f"- upscaled-photo top-1 within 1 point of the originals (new path): "
        f"**{'met' if abs(gap) <= 1 else 'not met'}** ({gap:+.1f} points)"
    )
    return "\n".join(lines)


def main() -> int:
    from PIL import Image

    from thali.core import build_plugin_manager
    from thali.registry import ModelRegistry

    data_default = Path(os.environ.get("THALI_DATA", REPO.parent / "shared" / "datasets"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=str(REPO / "models"))
    parser.add_argument("--domain", default="south_asian_food")
    parser.add_argument("--variant", default=None, help="served variant (default: the package's)")
    parser.add_argument("--data", type=Path, default=data_default / "south_asian_food")
    parser.add_argument("--per-class", type=int, default=8, help="validation photos a class for top-1")
    parser.add_argument("--requests", type=int, default=300, help="measured requests a server row")
    parser.add_argument("--pool", type=int, default=40, help="distinct 12 MP JPEGs the load posts")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    args = parser.parse_args()
    if not args.data.is_dir():
        parser.error("the shared photos are needed: --data DIR (or $THALI_DATA)")
    registries = build_plugin_manager().registries
    package = ModelRegistry(args.registry).resolve(args.domain, "production")
    args.variant = args.variant or package.manifest.serving.variant
    out = args.out / time.strftime("phone-photos-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    photos = validation_photos(registries, args.domain, Path(args.data), args.per_class)
    web = next(p for p, _ in photos if 350 <= max(Image.open(p).size) <= 450)
    decode = decode_rows(package, web, args.repeats)
    top1 = accuracy_rows(package, args.variant, photos)
    say(f"top-1: {json.dumps(top1)}")
    served = server_rows(args, photos, out)
    model = f"Model: {args.domain} v{package.version} ({args.variant}) from {args.registry}; 2-core machine."
    text = table(decode, served, top1, model)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps({"decode": decode, "served": served, "top1": top1}, indent=1, default=str)
    )
    say("\n" + text + f"\n\nwritten: {out / 'results.json'}, {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
