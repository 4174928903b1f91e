"""The plant_disease domain arrives as its own plugin package (domains/plant_disease): installed, found
through its entry point, with a dataset reader of its own that reads the PlantVillage layout."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers import run_thali, thali_in_process

pytest.importorskip("thali_plant_disease", reason="pip install -e domains/plant_disease (make test does)")


def test_the_package_registers_its_domain_and_reader_through_its_entry_point() -> None:
    from thali.core import build_plugin_manager

    pm = build_plugin_manager(autoload=True)
    info = {p.name: p for p in pm.plugins()}["plant_disease"]
    assert info.source == "entry-point" and info.distribution == "thali-plant-disease"
    assert info.components == {"datasets": ["plantvillage"], "domains": ["plant_disease"]}
    config = pm.registries.domains.create("plant_disease").load_config()
    assert config.dataset.name == "plantvillage" and len(config.classes) == 3


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def test_the_reader_maps_plantvillage_folders_and_skips_exact_copies(tmp_path: Path) -> None:
    from thali_plant_disease.reader import read_plantvillage

    for folder, colours in {
        "Potato___Early_blight": [(90, 60, 20), (95, 60, 20)],
        "Potato___healthy": [(40, 160, 40)],
        "Potato___Late_blight": [(30, 30, 30)],
        "Tomato___Bacterial_spot": [(200, 30, 30)],
    }.items():
        (tmp_path / folder).mkdir()
        for i, colour in enumerate(colours):
            (tmp_path / folder / f"{i}.JPG").write_bytes(_jpeg(colour))
    (tmp_path / "Potato___healthy" / "copy.jpg").write_bytes(_jpeg((90, 60, 20)))  # same bytes as blight 0

    found = read_plantvillage(tmp_path, crops=["potato"])
    assert found.classes == ["potato_early_blight", "potato_healthy", "potato_late_blight"]
    assert len(found.samples) == 4 and all(0 <= i < 3 for _, i in found.samples)
    assert [p.name for p, why in found.problems] == ["copy.jpg"] and "exact copy" in found.problems[0][1]
    assert len(read_plantvillage(tmp_path).classes) == 4  # every crop


def test_thali_lists_the_plugin_and_validates_the_domain() -> None:
    plugins = run_thali("plugins")  # the installed package, found by a fresh interpreter's entry points
    assert "plant_disease  [entry point; thali-plant-disease 0.1.0" in plugins.stdout
    checked = thali_in_process("config", "validate", "plant_disease")
    assert checked.returncode == 0 and "plant_disease: ok (3 classes" in checked.stdout


def test_thali_check_passes_on_the_plant_plugin() -> None:
    done = thali_in_process("check", "plant_disease")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "datasets plantvillage" in done.stdout and "domains plant_disease" in done.stdout
    assert " 0 failed" in done.stdout.strip().splitlines()[-1]
