"""``thali train`` and ``thali evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from thali.core.config import check_components, load_config
from thali.core.domains import resolve_domain
from thali.core.errors import ConfigError

from .context import Context, print_json, registry_model
from .extras import require_train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a domain pack from its config")
    p.add_argument("domain", help="registered domain name, or a folder / domain.yaml path")
    p.add_argument(
        "--data",
        action="append",
        help="data folder or manifest (else dataset.path or $THALI_DATA); repeat it to merge several by "
        "class name, e.g. the photos and the corrections of `thali feedback export`",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--preset", action="append", default=[], help="merge a preset of the domain pack")
    p.add_argument("--run-dir", type=Path, help="where the run is written (default runs/DOMAIN/TIME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (or the latest)")
    p.add_argument("--stop-after-epochs", type=int, metavar="N", help="stop this invocation after N epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "evaluate", help="score a training run or a registry model on an ImageFolder directory"
    )
    e.add_argument(
        "model",
        metavar="RUN|DOMAIN[@REF]",
        help="a training run directory, or a registry model: DOMAIN, DOMAIN@VERSION or DOMAIN@ALIAS "
        "(default: the production alias if set, else the latest version)",
    )
    e.add_argument("--data", required=True, type=Path, help="ImageFolder directory to score")
    e.add_argument("--variant", help="registry model: the variant to score (default fp32)")
    e.add_argument("--backend", help="registry model: the serving backend to run it (default onnxruntime)")
    e.add_argument(
        "--run",
        type=Path,
        help="registry model, --backend torch: the training run folder it was exported from "
        "(default $THALI_RUNS or runs/, then DOMAIN/RUN_ID from the manifest)",
    )
    e.add_argument(
        "--registry", help="registry model: where it is (default $THALI_REGISTRY or ./model-registry)"
    )
    e.add_argument("--trusted-key", action="append", type=Path, help="registry model: trust this public key")
    e.add_argument("--json", action="store_true", help="print all metrics as one JSON object")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_evaluate)

    w = sub.add_parser(
        "wise-ft",
        help="interpolate a linear-probe run and a fine-tuned run of one model (WiSE-FT) into a new run",
    )
    w.add_argument("probe", type=Path, help="run folder of the linear probe (the head trained alone)")
    w.add_argument("tuned", type=Path, help="run folder of the fine-tuned model (same model)")
    w.add_argument("--out", required=True, type=Path, help="new run folder for the interpolated model")
    w.add_argument(
        "--alpha",
        type=float,
        help="weight of the fine-tuned run, 0-1 (default: chosen from 0, .25, .5, .75, 1 on the validation "
        "photos of the training collections)",
    )
    w.add_argument("--data", type=Path, help="the data folder, if it moved since training")
    w.add_argument("--json", action="store_true", help="print the result as JSON")
    w.set_defaults(func=run_wise_ft)


def _latest_run(domain: str) -> Path:
    runs = sorted((Path("runs") / domain).glob("*/last.pt"))
    if not runs:
        raise ConfigError(f"--resume: no run of {domain} under runs/{domain}; pass --run-dir")
    return runs[-1].parent


def run_train(ctx: Context) -> int:
    require_train("train")
    from thali.core.training.trainer import TrainOptions, train

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 speaks
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    args, pm = ctx.args, ctx.plugins
    run_dir = args.run_dir
    if args.resume:  # the run's own resolved config, not today's domain.yaml
        run_dir = run_dir or _latest_run(resolve_domain(pm.registries, args.domain).name)
        config = load_config(run_dir / "config.yaml", args.overrides)
    else:
        pack = resolve_domain(pm.registries, args.domain)
        config = pack.load_config(args.overrides, args.preset)
        run_dir = run_dir or Path("runs") / pack.name / time.strftime("%Y%m%d-%H%M%S")
    check_components(config, pm.registries)
    options = TrainOptions(
        run_dir=run_dir,
        data=args.data,
        resume=args.resume,
        stop_after_epochs=args.stop_after_epochs,
        progress=not args.no_progress,
    )
    result = train(config, pm.registries, options)
    if not main_rank:
        return 0
    if args.json:
        print_json(result)
        return 0
    for note in result["notes"]:
        print(f"note: {note}")
    if not result["finished"]:
        print(f"stopped after {result['epochs_run']} epoch(s); continue with:")
        print(f"  thali train {args.domain} --resume --run-dir {run_dir}")
        return 0
    m = result.get("metrics")
    if m:
        v, c = m["val"], m["calibration"]
        print(
            f"{config.name}: val top-1 {v['top1']:.3f}  top-5 {v['top5']:.3f}  "
            f"ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f} (T={c['temperature']:.2f})"
        )
    print(f"run: {run_dir}")
    return 0


def _registry_model(ctx: Context) -> dict[str, Any]:
    """Score ``DOMAIN[@REF]`` from the model registry through a serving backend."""
    from thali.core.inference.evaluate import evaluate_package

    args = ctx.args
    package = registry_model(args.model, args.registry, args.trusted_key)
    return evaluate_package(
        package,
        args.data,
        ctx.plugins.registries,
        backend=args.backend or "onnxruntime",
        variant=args.variant or "fp32",
        progress=not args.no_progress,
        **({"run_dir": args.run} if args.run else {}),
    )


def run_evaluate(ctx: Context) -> int:
    args = ctx.args
    if Path(args.model).is_dir():
        given = [
            f"--{n.replace('_', '-')}"
            for n in ("variant", "backend", "run", "registry", "trusted_key")
            if getattr(args, n)
        ]
        if given:
            raise ConfigError(f"{', '.join(given)}: for a registry model, not a training run ({args.model})")
        require_train("evaluate RUN_DIR")
        from thali.core.training.evaluate import evaluate_run

        result = evaluate_run(
            Path(args.model), args.data, ctx.plugins.registries, progress=not args.no_progress
        )
    else:
        result = _registry_model(ctx)
    if args.json:
        print(json.dumps(result))
        return 0
    if "model" in result:
        print(f"{result['model']} ({result['variant']}, {result['backend']} on {result['provider']})")
    print(
        f"{result['images']} images: top-1 {result['top1']:.3f}  top-5 {result['top5']:.3f}  "
        f"ECE {result['ece']:.3f}  NLL {result['nll']:.3f}"
    )
    for name, stats in result["per_class"].items():
        if stats["support"]:
            print(
                f"  {name:<24} precision {stats['precision']:.2f}  "
                f"recall {stats['recall']:.2f}  n={stats['support']}"
            )
    if result.get("val_cross"):
        from thali.core.training.evaluate import cross_line

        print(cross_line(result["val_cross"]))
    if result.get("problems"):
        print(f"note: {result['problems']}")
    return 0


def run_wise_ft(ctx: Context) -> int:
    args = ctx.args
    require_train("wise-ft")
    from thali.core.training.wise import wise_ft

    result = wise_ft(
        args.probe, args.tuned, args.out, ctx.plugins.registries, alpha=args.alpha, data=args.data
    )
    if args.json:
        print(json.dumps(result))
        return 0
    tried = ", ".join(f"{a}: {100 * t:.1f} %" for a, t in result["top1_by_alpha"].items())
    print(f"alpha {result['alpha']:g} (top-1 on {result['chosen_on']}: {tried})")
    if cross := result.get("val_cross"):  # measured on the mix chosen, never chosen on
        print(
            f"held-out collections ({cross['images']} images, never chosen on): top-1 {cross['top1']:.3f}  "
            f"top-5 {cross['top5']:.3f}  ECE {cross['ece']:.3f}"
        )
        for group, entry in cross["per_collection"].items():
            print(f"  {group}: top-1 {entry['top1']:.3f} ({entry['images']} images)")
    print(f"wrote {args.out} (temperature {result['temperature']:.3f})")
    print(f"export it with `thali export {args.out}`")
    return 0
