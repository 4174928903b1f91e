"""``thali publish`` and ``thali registry list|show|promote|rm``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from thali.core.manifest import read_manifest

from .signing import TRUST_ENV

URL_HELP = "a folder, memory://, s3://bucket/prefix, gs://… (default $THALI_REGISTRY or ./model-registry)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish an export folder as the next version of its domain")
    p.add_argument("export", type=Path, help="a folder written by `thali export`")
    p.add_argument("--registry", help=URL_HELP)
    p.add_argument("--alias", action="append", default=[], help="also point this alias at it (repeatable)")
    p.add_argument("--sign-key", type=Path, help="sign the package with this Ed25519 private key (PEM)")
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
    verify = rs.add_parser("verify", help="check a version's checksums and, with trusted keys, its signature")
    verify.add_argument("domain")
    verify.add_argument("version", nargs="?", default="latest", help="number, alias or 'latest' (default)")
    verify.add_argument("--json", action="store_true")
    keygen = rs.add_parser("keygen", help="make an Ed25519 key pair for signing packages")
    keygen.add_argument("key", type=Path, help="private key file to write (the public key goes to KEY.pub)")
    for sp in (ls, show, promote, rm, verify):
        sp.add_argument("--registry", help=URL_HELP, default=argparse.SUPPRESS)
        sp.add_argument(
            "--trusted-key",
            action="append",
            type=Path,
            default=argparse.SUPPRESS,
            help=f"trust packages signed by this public key (repeatable; also ${TRUST_ENV})",
        )
    r.set_defaults(func=run_registry)
    from .feedback_cli import register as register_feedback

    register_feedback(sub)


def _registry(args: argparse.Namespace) -> Any:
    from thali.registry import ModelRegistry

    return ModelRegistry(getattr(args, "registry", None), trusted_keys=getattr(args, "trusted_key", None))


def run_publish(ctx: Any) -> int:
    from thali.core.cli.context import print_json

    args = ctx.args
    registry = _registry(args)
    result = registry.publish(args.export, aliases=args.alias, sign_key=args.sign_key)
    result["registry"] = registry.url
    if args.json:
        print_json(result)
        return 0
    aliases = f" (alias {', '.join(args.alias)})" if args.alias else ""
    signed = " signed" if result["signed"] else ""
    print(f"published{signed} {result['domain']} v{result['version']}{aliases} to {registry.url}")
    return 0


def run_registry(ctx: Any) -> int:
    from thali.core.cli.context import print_json

    args = ctx.args
    if args.action == "keygen":
        from .signing import generate_keypair

        key_id = generate_keypair(args.key, Path(f"{args.key}.pub"))
        print(f"wrote {args.key} (private: keep it offline) and {args.key}.pub (give this one to readers)")
        print(f"key id {key_id}")
        return 0
    registry = _registry(args)
    if args.action == "verify":
        result = registry.verify(args.domain, args.version)
        if args.json:
            print_json(result)
            return 0
        head = f"{result['domain']} v{result['version']}: {len(result['files'])} files match their checksums"
        if result["signed_by"]:
            print(f"{head}; signed by trusted key {result['signed_by']}")
        else:
            signed = "signed" if result["signed"] else "not signed"
            print(f"{head}; {signed} (no trust policy: pass --trusted-key or set ${TRUST_ENV})")
        return 0
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
        card = read_manifest(info["card"], f"{info['domain']} v{info['version']}")
        print(f"{info['domain']} v{info['version']}  aliases: {', '.join(info['aliases']) or '-'}")
        lineage = card.lineage
        print(f"  published {card.published_at} with thali {card.thali_version}; run {lineage.run_id}")
        fingerprint = str(card.dataset.fingerprint or "?")[:16]
        print(f"  data fingerprint {fingerprint}…  licence: {card.licence}")
        print(f"  signature: {'signed' if info['signed'] else 'unsigned'}")
        for name, m in card.variants.items():
            scores = "  ".join(f"{label} {_score(getattr(m, key), pct)}" for label, key, pct in SCORES)
            print(f"  {name:<13} {m.file!s:<24} {scores}")
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


SCORES = (("top-1", "top1", True), ("top-5", "top5", True), ("ECE", "ece", False))


def _score(value: Any, percent: bool) -> str:
    if not isinstance(value, int | float):
        return "?"
    return f"{100 * value:.2f}%" if percent else f"{value:.3f}"
