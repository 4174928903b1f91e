"""``thali feedback list DOMAIN`` and ``thali feedback export DOMAIN --out DIR``: the corrections of a
feedback store, counted, and written out as a photo collection the next ``thali train`` reads.

The export is an ImageFolder (``DIR/CLASS/SHA256.EXT``, each photo once, under the label of its newest
record) with ``DIR/manifest.csv`` (``file,class,source_repo,model_version,record``) whose
``source_repo`` names the feedback store, so ``dataset.split.group`` treats the corrections as their
own collection; ``none_of_these`` photos go to ``DIR_ood/`` beside it, a folder ``export.unknown.ood``
takes (``--set 'export.unknown.ood=[DIR_ood]'``). Writes are atomic; an existing file of the same content
is left as it is, so an export can be run again into the same folder."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

from thali.core.errors import DataError
from thali.core.files import write_atomic

from .feedback import FEEDBACK_ENV, NONE_OF_THESE, SUFFIX, FeedbackStore

STORE_HELP = f"the feedback store: a folder or fsspec URL (default ${FEEDBACK_ENV})"
MAX_PHOTO_BYTES = 50 * 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("feedback", help="list and export the corrections people sent")
    fs = f.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = fs.add_parser("list", help="corrections of a domain: counts per label and per model version")
    ls.add_argument("domain")
    ls.add_argument("--limit", type=int, default=20, help="newest records to show (default 20)")
    ls.add_argument("--json", action="store_true")
    ex = fs.add_parser("export", help="write the corrections as an ImageFolder with manifest.csv")
    ex.add_argument("domain")
    ex.add_argument("--out", type=Path, required=True, help="folder to write (created; reused if it exists)")
    ex.add_argument(
        "--ood-out", type=Path, help="folder for none_of_these photos (default OUT_ood beside it)"
    )
    for sp in (ls, ex):
        sp.add_argument("--store", help=STORE_HELP)
    f.set_defaults(func=run_feedback)


def _store(args: argparse.Namespace) -> FeedbackStore:
    import os

    url = args.store or os.environ.get(FEEDBACK_ENV)
    if not url:
        raise DataError(f"no feedback store: pass --store URL or set ${FEEDBACK_ENV}")
    return FeedbackStore(url)


def run_feedback(ctx: Any) -> int:
    args = ctx.args
    store = _store(args)
    if args.action == "list":
        return _list(store, args)
    return _export(store, args)


def _list(store: FeedbackStore, args: argparse.Namespace) -> int:
    from thali.core.cli.context import print_json

    records = store.records(args.domain)
    versions: dict[str, int] = {}
    for record in records:
        key = f"v{record.get('model_version')} {record.get('variant')}"
        versions[key] = versions.get(key, 0) + 1
    summary = {
        "domain": args.domain,
        "store": store.url,
        "total": len(records),
        "photos": len({r["image_sha256"] for r in records}),
        "counts": store.counts(records),
        "by_model": versions,
        "records": records[: args.limit],
    }
    if args.json:
        print_json(summary)
        return 0
    print(f"{args.domain}: {len(records)} corrections of {summary['photos']} photos in {store.url}")
    for label, count in sorted(summary["counts"].items()):
        print(f"  {label:<28} corrected {count['corrected']:>5}   agreed {count['agreed']:>5}")
    for model, count in sorted(versions.items()):
        print(f"  answered by {model}: {count}")
    for record in summary["records"]:
        note = f"  ({record['note']})" if record.get("note") else ""
        print(
            f"  {record['created']}  {record['image_sha256'][:12]}  model said "
            f"{record.get('answer_label')!s:<20} -> {record['label']}{note}"
        )
    return 0


def _export(store: FeedbackStore, args: argparse.Namespace) -> int:
    out: Path = args.out
    ood: Path = args.ood_out or out.with_name(out.name + "_ood")
    newest: dict[str, dict[str, Any]] = {}
    for record in store.records(args.domain):  # newest first: the first record of a photo wins
        newest.setdefault(record["image_sha256"], record)
    rows, written, outside = [], 0, 0
    for sha, record in sorted(newest.items()):
        label, suffix = str(record["label"]), SUFFIX.get(str(record.get("format")))
        if suffix is None:
            continue
        try:
            photo, suffix = store.photo(args.domain, sha, MAX_PHOTO_BYTES)
        except FileNotFoundError:
            print(f"warning: the photo of record {record['id']} is missing from the store; skipped")
            continue
        if label == NONE_OF_THESE:
            target, outside = ood / f"{sha}.{suffix}", outside + 1
        else:
            if "/" in label or label.startswith(".") or not label:  # the server checked it; a store may lie
                print(f"warning: record {record['id']} has the label {label!r}, not a folder name; skipped")
                continue
            target = out / label / f"{sha}.{suffix}"
            rows.append(
                [
                    f"{label}/{sha}.{suffix}",
                    label,
                    f"feedback:{store.url}",
                    record["model_version"],
                    record["id"],
                ]
            )
        if not (target.is_file() and target.stat().st_size == len(photo)):
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, photo)
        written += 1
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", "class", "source_repo", "model_version", "record"])
    writer.writerows(rows)
    write_atomic(out / "manifest.csv", text.getvalue().encode())
    print(
        f"exported {written} photos of {args.domain} from {store.url}: {len(rows)} in {out} "
        f"(ImageFolder + manifest.csv), {outside} none_of_these in {ood}"
    )
    return 0
