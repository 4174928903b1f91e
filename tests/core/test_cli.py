"""The ``thali`` command: output, exit codes, one-line errors (the installed console script once, in a
process of its own; the rest through its entry point in this process)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import run_thali, thali_in_process


def test_domains_and_config_show() -> None:
    listed = run_thali("domains", "--json")  # the installed console script, in a process of its own
    assert listed.returncode == 0, listed.stderr
    food = next(d for d in json.loads(listed.stdout) if d["name"] == "south_asian_food")
    assert food["classes"] == 27 and food["plugin"] == "thali.plugins.domain_packs"

    shown = thali_in_process("config", "show", "south_asian_food", "--set", "training.epochs=3")
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    assert config["training"]["epochs"] == 3
    assert config["classes"][2] == {"name": "chaat", "display_name": "Chaat", "description": ""}


def test_user_mistakes_print_one_line_and_exit_non_zero() -> None:
    cases = [
        (("config", "show", "south_asian_fod"), "error: unknown domain 'south_asian_fod'; did you mean"),
        (("config", "show", "south_asian_food", "--set", "training.epoch=3"), "training.epoch"),
        (("plugins", "--kind", "backbone"), "error: unknown component kind 'backbone'"),
        (("publish", "runs/x"), "error: runs/x: not an export"),
        (("export", "runs/x"), "error: runs/x: not a training run"),
        (("train", "south_asian_food", "--data", "/nonexistent"), "error: /nonexistent: no such data folder"),
    ]
    for args, expected in cases:
        result = thali_in_process(*args)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: "), result.stderr
        assert expected in result.stderr.splitlines()[0], (args, result.stderr)
    assert not list(Path("runs").glob("south_asian_food/*")), "a run that never started leaves no folder"


def test_a_room_that_cannot_be_imported_is_one_line_naming_it(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """A broken install (here thali.api.cli cannot be imported: Python's import system raises
    ImportError for a module set to None) keeps every other command and makes ``thali serve`` say
    which room is missing and why, in one line, instead of a traceback or a 'not available yet'."""
    import sys

    from thali.core.cli.main import main

    monkeypatch.setitem(sys.modules, "thali.api.cli", None)
    assert main(["serve", "--registry", "models"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: `thali serve` is unavailable: thali.api.cli")
    assert main(["--no-autoload", "domains", "--json"]) == 0  # the rest still works
