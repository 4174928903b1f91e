"""Rewrite the bundled packages' ``card.json`` (``models/``) in the current manifest format.

A format-1 card (thali 0.1) loads anyway (:func:`thali.core.manifest.read_manifest` upgrades it on
read); rewriting it drops the training machine's folders it carried and lets the file say what it is.
Only ``card.json`` and ``checksums.json`` change; a signed package is refused (its signature covers the
old checksums). Each file is written atomically.

    python benchmarks/upgrade_bundled_manifests.py [models]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from thali.core.files import write_atomic
from thali.core.manifest import CARD, FORMAT, read_manifest

REPO = Path(__file__).resolve().parents[1]


def upgrade(version_dir: Path) -> bool:
    """Rewrite one version folder; False when it is already current."""
    card = json.loads((version_dir / CARD).read_text())
    if card.get("format") == FORMAT:
        return False
    if (version_dir / "signature.json").exists():
        raise SystemExit(f"{version_dir}: signed; re-publish it from its export instead")
    manifest = read_manifest(card, str(version_dir))
    write_atomic(version_dir / CARD, manifest.to_json())
    checksums = json.loads((version_dir / "checksums.json").read_text())
    checksums["files"][CARD] = hashlib.sha256((version_dir / CARD).read_bytes()).hexdigest()
    write_atomic(version_dir / "checksums.json", json.dumps(checksums, indent=1).encode())
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="?", type=Path, default=REPO / "models")
    args = ap.parse_args()
    for version_dir in sorted(args.models.glob("*/versions/*")):
        if (version_dir / CARD).is_file():
            state = "upgraded" if upgrade(version_dir) else "current"
            print(f"{version_dir.relative_to(args.models)}: {state}")


if __name__ == "__main__":
    main()
