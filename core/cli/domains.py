"""``thali domains``: the domain packs found."""

from __future__ import annotations

import argparse

from .context import Context, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("domains", help="list the domain packs found")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    entries = ctx.plugins.registries.domains.list()
    rows = [
        {
            "name": e.name,
            "plugin": e.plugin,
            "classes": e.metadata.get("classes"),
            "description": e.description,
            "path": e.metadata.get("path"),
            "presets": list(e.metadata.get("presets", [])),
        }
        for e in entries
    ]
    if ctx.args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no domain packs found; install a plugin that registers one")
        return 0
    width = max(len(e.name) for e in entries)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['classes']:>3} classes  {r['description']}")
        print(f"{'':<{width}}  from {r['plugin']}: {r['path']}")
        if r["presets"]:
            print(f"{'':<{width}}  presets: {', '.join(r['presets'])}")
    return 0
