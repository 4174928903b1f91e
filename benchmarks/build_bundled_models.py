"""Rebuild the bundled model registry (``models/``) from scratch: train each bundled domain with its
pack's default recipe, export it with the pack's export settings (gated variants), publish it with
alias ``production``, keep only what serving needs.

    python benchmarks/build_bundled_models.py [--data DIR] [--domain south_asian_food] [--out models]
                                              [--preset NAME] [--reexport [--trained TEXT]]

``--preset`` trains with a preset of the pack: the bundled south_asian_food model is made on a GPU machine
with ``--domain south_asian_food --preset full_finetune_gpu``. ``--reexport`` keeps the training run
already in ``--work`` and only exports and publishes it again (for a change in the export, such as the
unknown score, or a run trained on another machine: ``--trained`` then says how, for models/README.md);
the versions it replaces are removed.

Needs the datasets (``--data``, ``$THALI_DATA`` or ../shared/datasets), the training install and the
plant_disease plugin package (``pip install -e domains/plant_disease``; ``make test`` installs it). Takes
about half an hour for south_asian_food and a few minutes for plant_disease on a 2-core CPU. The card
of every published version records the command, the data fingerprint and the validation metrics;
``thali registry show DOMAIN production --registry models`` prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
BUNDLED = ("south_asian_food", "plant_disease")  # plant_disease: the plugin package domains/plant_disease
MAX_BYTES = 20 * 1024 * 1024  # per domain, everything it ships


def arguments() -> argparse.Namespace:
    default_data = Path(os.environ.get("THALI_DATA") or REPO.parent / "shared" / "datasets")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=default_data, help="folder holding one folder per domain"
    )
    parser.add_argument("--domain", action="append", help=f"domains to build (default: {', '.join(BUNDLED)})")
    parser.add_argument("--out", type=Path, default=REPO / "models", help="the bundled registry")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bundled", help="runs and exports")
    parser.add_argument("--variants", default="fp32,int8", help="variants to export (fp32 is always made)")
    parser.add_argument(
        "--reexport", action="store_true", help="export and publish the existing runs again; no training"
    )
    parser.add_argument(
        "--preset", action="append", default=[], help="train with this preset of the pack (repeatable)"
    )
    parser.add_argument(
        "--trained",
        help="with --reexport: how the run in --work was trained, for models/README.md (e.g. a GPU preset "
        "run on another machine); default: the pack's default recipe on a 2-core CPU",
    )
    args = parser.parse_args()
    if args.trained and not args.reexport:
        parser.error("--trained describes a run made elsewhere: use it with --reexport")
    if args.preset and args.reexport:
        parser.error("--preset chooses how to train: --reexport trains nothing (say how with --trained)")
    if args.preset and len(args.domain or []) != 1:
        parser.error("--preset belongs to one domain pack: name it with one --domain")
    return args


def train_run(args: argparse.Namespace, name: str, data: Path, run_dir: Path, registries: Any) -> int:
    """Train ``name`` into ``run_dir`` (or, with --reexport, check the run is there); 0, else the exit
    status after the error printed."""
    from thali.core.domains import resolve_domain
    from thali.core.errors import ConfigError
    from thali.core.training.trainer import TrainOptions, train

    if args.reexport:
        if not (run_dir / "best.pt").is_file():
            print(f"error: {run_dir}: no training run to export again; run without --reexport")
            return 2
        print(f"{name}: exporting {run_dir} again (no training) …", flush=True)
        return 0
    try:  # before the old run is removed: a misspelt preset loses nothing
        config = resolve_domain(registries, name).load_config(presets=args.preset)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if run_dir.exists():
        shutil.rmtree(run_dir)
    recipe = ", ".join(f"--preset {p}" for p in args.preset) or "the pack's default recipe"
    print(f"{name}: training {recipe} on {data} …", flush=True)
    result = train(config, registries, TrainOptions(run_dir=run_dir, data=str(data), progress=True))
    val = result["metrics"]["val"]
    scores = f"top-1 {val['top1']:.3f} top-5 {val['top5']:.3f} ECE {val['ece']:.3f}"
    print(f"{name}: val {scores}", flush=True)
    return 0


def export_and_publish(
    args: argparse.Namespace, name: str, run_dir: Path, registries: Any, registry: Any, started: float
) -> None:
    """Export the run with the pack's settings, publish it as production, keep only that version, and
    write its section of models/README.md."""
    from thali.core.exporting.pipeline import export_run

    previous = registry.versions(name) if name in registry.domains() else []
    export_dir = args.work / name / "export"
    variants = [v for v in args.variants.split(",") if v]
    export_run(run_dir, registries, out_dir=export_dir, overrides=[f"export.variants={json.dumps(variants)}"])
    published = registry.publish(export_dir, aliases=["production"])
    version = published["version"]
    for old in previous:  # the bundled registry keeps one version per domain: git holds the history
        shutil.rmtree(args.out / name / "versions" / str(old))
        (args.out / name / "claims" / str(old)).unlink(missing_ok=True)
    size = sum(published["files"].values())
    if size > MAX_BYTES:
        print(
            f"warning: {name} v{version} ships {size / 1e6:.1f} MB, over the 20 MB budget",
            file=sys.stderr,
        )
    minutes = (time.time() - started) / 60
    print(f"{name}: published v{version} (production) to {args.out}: {size / 1e6:.1f} MB, {minutes:.0f} min")
    write_readme(
        args.out,
        name,
        version,
        registry.show(name, version),
        minutes,
        args.reexport,
        args.trained,
        args.preset,
    )


def main() -> int:
    args = arguments()

    from thali.core import build_plugin_manager
    from thali.registry import ModelRegistry

    registries = build_plugin_manager().registries  # entry points too: plant_disease is a plugin package
    registry = ModelRegistry(args.out, cache_dir=args.work / "cache")
    for name in args.domain or BUNDLED:
        data = args.data / name
        if not data.is_dir():
            print(f"error: {data}: no data for {name} (pass --data DIR or set THALI_DATA)", file=sys.stderr)
            return 2
        started = time.time()
        run_dir = args.work / name / "run"
        if name not in registries.domains.names():
            print(f"error: no domain pack {name!r}; for plant_disease: pip install -e domains/plant_disease")
            return 2
        if status := train_run(args, name, data, run_dir, registries):
            return status
        export_and_publish(args, name, run_dir, registries, registry, started)
    return 0


def unknown_line(unknown: dict) -> list[str]:
    """The card's unknown-flag rates, in one line (packages exported before it have none)."""
    from thali.core.exporting.unknown import flag_rates, rates_text

    if not (shown := flag_rates(unknown)):
        return []
    return [
        f"- unknown flag ({unknown['method']}): {rates_text(shown)}"
        " (out-of-domain rates on the half of those photos that did not choose the thresholds)"
    ]


def write_readme(
    out: Path,
    name: str,
    version: int,
    info: dict,
    minutes: float,
    reexport: bool = False,
    trained: str | None = None,
    presets: list[str] | None = None,
) -> None:
    """``models/README.md``: how each bundled model was made, so it is never an unexplained binary."""
    card = info["card"]
    if trained:
        made = (
            f"- trained: {trained}; exported and published with `python benchmarks/build_bundled_models.py "
            f"--domain {name} --reexport` ({minutes:.0f} min on a 2-core CPU): its export settings, gated "
            "variants"
        )
    elif presets:
        flags = "".join(f" --preset {p}" for p in presets)
        made = (
            f"- made with: `python benchmarks/build_bundled_models.py --domain {name}{flags}` "
            f"({minutes:.0f} min on {os.cpu_count()} CPU cores and what GPU there was): its export settings, "
            "gated variants"
        )
    else:
        made = (
            f"- made with: `python benchmarks/build_bundled_models.py --domain {name}`"
            + (
                " (training: 30-50 min on a 2-core CPU), exported again with `--reexport` "
                f"({minutes:.0f} min)"
                if reexport
                else f" ({minutes:.0f} min on a 2-core CPU)"
            )
            + ": the pack's default recipe, its export settings, gated variants"
        )
    lines = [
        f"## {name} v{version} (alias production)",
        "",
        made,
        f"- data: fingerprint `{card['dataset'].get('fingerprint', '?')}`, "
        f"{card['dataset'].get('validation_images', '?')} validation images",
        f"- licence of the data: {card['dataset'].get('licence', 'not stated')}",
        "- files: " + ", ".join(f"`{f}` {b / 1e6:.2f} MB" for f, b in sorted(info["files"].items())),
        *unknown_line(card.get("unknown") or {}),
        "",
        "| variant | top-1 | top-5 | ECE |",
        "|---|---:|---:|---:|",
    ]
    for variant, m in card["metrics"].items():
        lines.append(f"| {variant} | {100 * m['top1']:.1f} % | {100 * m['top5']:.1f} % | {m['ece']:.3f} |")
    head = (
        "# Bundled models\n\nA model registry (`thali serve --registry models`) with the models `make run` "
        "serves. Rebuild with `python benchmarks/build_bundled_models.py`; validation figures are from the "
        "pack's own split (same collections as training: expect lower numbers on other photos).\n\n"
    )
    readme = out / "README.md"
    body = readme.read_text() if readme.exists() else head
    section = "\n".join(lines) + "\n"
    marker = f"## {name} v"
    kept = [part for part in body.split("\n## ") if not ("## " + part).startswith(marker)]
    body = "\n## ".join(kept).rstrip() + "\n\n" + section
    readme.write_text(body)


if __name__ == "__main__":
    sys.exit(main())
