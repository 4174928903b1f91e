"""``thali predict DOMAIN[@REF] SOURCE... --out FILE``: bulk classification with the server's own
torch-free path (see :mod:`thali.core.inference.bulk`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from thali.core.errors import NotAvailableError

from .context import Context, print_json, registry_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify photos in bulk into a .csv, .jsonl or .parquet file")
    p.add_argument("model", help="a registry model: DOMAIN, DOMAIN@VERSION or DOMAIN@ALIAS")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder (recursive), a glob, an fsspec URL (s3://bucket/prefix/) or a .txt/.csv list of paths",
    )
    p.add_argument("--out", type=Path, required=True, help="the output: FILE.csv, FILE.jsonl or FILE.parquet")
    p.add_argument("--resume", action="store_true", help="skip photos already in --out and append the rest")
    p.add_argument("--variant", help="the package variant (default: its serving variant)")
    p.add_argument("--top-k", type=int, default=5, help="labels per photo (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="photos per engine batch (default 32)")
    p.add_argument("--threads", type=int, help="decoding threads and engine threads (default: the CPUs)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default) or ray")
    p.add_argument(
        "--ray-address", help="--engine ray: an existing cluster (default $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--actors", type=int, help="--engine ray: actors in the pool (default: the CPUs over --threads)"
    )
    p.add_argument("--registry", help="where the model is (default $THALI_REGISTRY or ./model-registry)")
    p.add_argument("--trusted-key", action="append", type=Path, help="serve only packages signed by it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_predict)


def _registry_url(given: str | None) -> str:
    """The registry the actors resolve from: as given (or the default), a local folder made absolute."""
    from thali.registry.store import default_url

    url = given or default_url()
    return str(Path(url).resolve()) if "://" not in url and Path(url).exists() else url


def _default_variant(package: object) -> str:
    """The package's serving variant, or fp32 when it lacks that file (as the server falls back)."""
    manifest = package.manifest  # type: ignore[attr-defined]
    wanted = manifest.serving.variant
    return wanted if wanted in manifest.variants else "fp32"


def run_predict(ctx: Context) -> int:
    args = ctx.args
    if args.engine == "ray":
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise NotAvailableError(
                "--engine ray needs the ray extra (Ray Data): pip install 'thali[ray]' "
                "(--engine local needs none)"
            ) from None
    from thali.core.inference.bulk import predict, predict_ray

    package = registry_model(args.model, args.registry, args.trusted_key, or_run=False)
    options = json.loads(os.environ.get("THALI_PREDICT_OPTIONS") or "{}")  # fsspec options of the sources
    common = {
        "variant": args.variant or _default_variant(package),
        "top_k": args.top_k,
        "batch_size": args.batch_size,
        "resume": args.resume,
        "storage_options": options,
    }
    if args.engine == "ray":
        summary = predict_ray(
            package,
            _registry_url(args.registry),
            args.sources,
            args.out,
            actors=args.actors,
            cpus_per_actor=args.threads or 1,
            address=args.ray_address,
            trusted_keys=[str(k) for k in args.trusted_key] if args.trusted_key else None,
            say=lambda text: print(text, file=sys.stderr, flush=True),  # stdout stays the summary (--json)
            **common,
        )
    else:
        summary = predict(
            package,
            ctx.plugins.registries,
            args.sources,
            args.out,
            threads=args.threads,
            progress=not args.no_progress,
            **common,
        )
    return _report(args, summary)


def _report(args: argparse.Namespace, summary: dict[str, object]) -> int:
    if args.json:
        print_json(summary)
        return 0
    rate = f", {summary['photos_per_s']} photos/s" if summary["photos_per_s"] else ""
    print(
        f"{summary['model']}: {summary['photos']} photos into {summary['out']} ({summary['errors']} could "
        f"not be read; {summary['skipped_already_done']} already there){rate}"
    )
    return 0
