"""``thali config show | validate``: the fully resolved config of a domain pack."""

from __future__ import annotations

import argparse

import yaml

from thali.core.config import DomainConfig, check_components
from thali.core.domains import resolve_domain

from .context import Context, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or validate a domain config")
    group = p.add_subparsers(dest="config_command", required=True, metavar="{show,validate}")
    for name, help_text in (
        ("show", "print the fully resolved config of a domain (defaults filled, overrides applied)"),
        ("validate", "check a domain config and the components it names"),
    ):
        q = group.add_parser(name, help=help_text)
        q.add_argument("domain", help="registered domain name, or a folder / domain.yaml path")
        q.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set training.epochs=3 (repeatable)",
        )
        q.add_argument("--preset", action="append", default=[], help="merge a preset of the domain pack")
        if name == "show":
            q.add_argument("--json", action="store_true", help="print JSON instead of YAML")
        q.set_defaults(func=run_show if name == "show" else run_validate)


def resolved(ctx: Context) -> DomainConfig:
    pm = ctx.plugins
    pack = resolve_domain(pm.registries, ctx.args.domain)
    config = pack.load_config(ctx.args.overrides, ctx.args.preset)
    check_components(config, pm.registries)
    return config


def run_show(ctx: Context) -> int:
    data = resolved(ctx).model_dump(mode="json")
    if ctx.args.json:
        print_json(data)
    else:
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return 0


def run_validate(ctx: Context) -> int:
    config = resolved(ctx)
    print(f"{config.name}: ok ({len(config.classes)} classes, backbone {config.model.backbone})")
    return 0
