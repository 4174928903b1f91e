"""``thali plugins``: which plugins are loaded, from where, and what each contributes."""

from __future__ import annotations

import argparse

from .context import Context, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list loaded plugins and the components they contribute")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--kind", help="only components of this kind (e.g. backbones)")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    pm = ctx.plugins
    report = pm.report(ctx.args.kind)
    if ctx.args.json:
        print_json(report)
        return 0
    infos = pm.plugins()
    for info in infos:
        where = {"builtin": "built-in", "entry-point": "entry point", "direct": "direct"}[info.source]
        dist = f"{info.distribution} {info.version or ''}".strip() if info.distribution else "-"
        print(f"{info.name}  [{where}; {dist}; module {info.module}]")
        for kind, names in info.components.items():
            if not ctx.args.kind or kind == ctx.args.kind:
                print(f"    {kind}: {', '.join(names)}")
        if not info.components:
            print("    (no components)")
    if pm.blocked:
        print(f"blocked: {', '.join(pm.blocked)}")
    return 0
