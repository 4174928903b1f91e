"""The data fingerprint in every model card: the same split is the same fingerprint wherever the data
folder lies and however split.json is formatted; a changed file or label is another fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thali.core.errors import DataError
from thali.core.exporting.data import fingerprint

SPLIT = {
    "root": "/data/south_asian_food",
    "classes": ["dosa", "idli"],
    "train": [["dosa/a.jpg", 0], ["idli/b.jpg", 1]],
    "val": [["idli/c.jpg", 1]],
    "test": [],
}


def _run(tmp_path: Path, name: str, split: object, indent: int | None = 1) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "split.json").write_text(json.dumps(split, indent=indent))
    return run


def test_same_split_elsewhere_or_reformatted_has_the_same_fingerprint(tmp_path: Path) -> None:
    here = fingerprint(_run(tmp_path, "here", SPLIT))
    moved = fingerprint(_run(tmp_path, "moved", {**SPLIT, "root": "/mnt/other/machine"}, indent=None))
    assert here == moved and len(here) == 64


def test_another_file_or_label_changes_the_fingerprint(tmp_path: Path) -> None:
    base = fingerprint(_run(tmp_path, "base", SPLIT))
    relabelled = {**SPLIT, "val": [["idli/c.jpg", 0]]}
    renamed = {**SPLIT, "train": [["dosa/z.jpg", 0], ["idli/b.jpg", 1]]}
    assert base != fingerprint(_run(tmp_path, "relabelled", relabelled))
    assert base != fingerprint(_run(tmp_path, "renamed", renamed))


def test_a_split_that_is_not_an_object_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected a JSON object"):
        fingerprint(_run(tmp_path, "list", [1, 2, 3]))
