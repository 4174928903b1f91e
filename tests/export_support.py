"""Edit a copy of an export folder the way a teammate with a text editor would, keeping export.json's
checksums right, so a test reaches the check it is about instead of the checksum check."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any


def edited_export(
    export: Path, out: Path, *, domain: str | None = None, serving: dict[str, Any] | None = None
) -> Path:
    """A copy of ``export`` at ``out`` for another ``domain`` and/or with other serving defaults in
    its manifest (``card.json``); export.json names the same domain and records the new sha256."""
    if not out.exists():
        shutil.copytree(export, out)
    card = json.loads((out / "card.json").read_text())
    report = json.loads((out / "export.json").read_text())
    if domain is not None:
        card["domain"] = report["domain"] = domain
    if serving:
        card["serving"] = {**card["serving"], **serving}
    (out / "card.json").write_text(json.dumps(card, indent=1))
    report["files"]["card.json"] = hashlib.sha256((out / "card.json").read_bytes()).hexdigest()
    (out / "export.json").write_text(json.dumps(report))
    return out
