"""``thali publish`` and ``thali registry list|show|promote|rm``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

URL_HELP = "a folder, memory://, s3://bucket/prefix, gs://… (default $THALI_REGISTRY or ./model-registry)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish an export folder as the next version of its domain")
    p.add_argument("export", type=Path, help="a folder written by `thali export`")
    p.add_argument("--registry", help=URL_HELP)
    p.add_argument("--alias", action="append", default=[], help="also point this alias at it (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_publish)

    r = sub.add_parser("registry", help="list, show, promote and remove model versions")
    r.add_argument("--registry", help=URL_HELP)
    rs = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = rs.add_parser("list", help="domains, versions and aliases")
    ls.add_argument("domain", nargs="?")
    ls.add_argument("--json", action="store_true")
    show = rs.add_parser("show", help="the card, files and aliases of one version")
    show.add_argument("domain")
    show.add_argument("version", nargs="?", default="latest", help="number, alias or 'latest' (default)")
    show.add_argument("--json", action="store_true")
    promote = rs.add_parser("promote", help="point an alias at a version")
    promote.add_argument("domain")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    rm = rs.add_parser("rm", help="remove a version (refused while an alias points to it)")
    rm.add_argument("domain")
    rm.add_argument("version")
    for sp in (ls, show, promote, rm):
        sp.add_argument("--registry", help=URL_HELP, default=argparse.SUPPRESS)
    r.set_defaults(func=run_registry)


def _registry(args: argparse.Namespace) -> Any:
    from thali.registry import ModelRegistry

    return ModelRegistry(getattr(args, "registry", None))


def run_publish(ctx: Any) -> int:
    from thali.core.cli.context import print_json

    args = ctx.args
    registry = _registry(args)
    result = registry.publish(args.export, aliases=args.alias)
    result["registry"] = registry.url
    if args.json:
        print_json(result)
        return 0
    aliases = f" (alias {', '.join(args.alias)})" if args.alias else ""
    print(f"published {result['domain']} v{result['version']}{aliases} to {registry.url}")
    return 0


def run_registry(ctx: Any) -> int:
    from thali.core.cli.context import print_json

    args = ctx.args
    registry = _registry(args)
    if args.action == "list":
        domains = [args.domain] if args.domain else registry.domains()
        listing = {d: {"versions": registry.versions(d), "aliases": registry.aliases(d)} for d in domains}
        if args.json:
            print_json({"registry": registry.url, "domains": listing})
            return 0
        if not listing:
            print(f"{registry.url}: empty (publish with `thali publish EXPORT_DIR`)")
        for domain, info in listing.items():
            by_version: dict[int, list[str]] = {}
            for alias, version in info["aliases"].items():
                by_version.setdefault(version, []).append(alias)
            shown = [
                f"v{v}" + (f" ({', '.join(by_version[v])})" if v in by_version else "")
                for v in info["versions"]
            ]
            print(f"{domain}: {'  '.join(shown) or 'no versions'}")
        return 0
    if args.action == "show":
        info = registry.show(args.domain, args.version)
        if args.json:
            print_json(info)
            return 0
        card = info["card"]
        print(f"{info['domain']} v{info['version']}  aliases: {', '.join(info['aliases']) or '-'}")
        lineage, dataset = card["lineage"], card["dataset"]
        print(f"  created {card['created_at']} with thali {card['thali_version']}; run {lineage.get('run')}")
        print(f"  data fingerprint {dataset.get('fingerprint', '?')[:16]}…  licence: {dataset['licence']}")
        for name, m in card["metrics"].items():
            scores = f"top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  ECE {m['ece']:.3f}"
            print(f"  {name:<13} {m['file']:<24} {scores}")
        for name, size in info["files"].items():
            print(f"  file {name:<24} {size / 1e6:8.2f} MB")
        return 0
    if args.action == "promote":
        version = registry.promote(args.domain, args.version, args.alias)
        print(f"{args.domain}: {args.alias} -> v{version}")
        return 0
    version = registry.remove(args.domain, args.version)
    print(f"removed {args.domain} v{version}")
    return 0
