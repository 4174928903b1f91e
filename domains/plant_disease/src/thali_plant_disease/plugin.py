"""The plugin thali loads from the entry point: one domain pack and one dataset reader.

Registering is cheap (no torch, no image decoding): the reader runs only when a domain is trained or
evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thali.core import hookimpl, register_domain_dir

HERE = Path(__file__).resolve().parent


@hookimpl
def thali_register_domains(registry: Any) -> None:
    register_domain_dir(registry, HERE, name="plant_disease")


@hookimpl
def thali_register_datasets(registry: Any) -> None:
    from .reader import read_plantvillage

    registry.add(
        "plantvillage",
        read_plantvillage,
        description="PlantVillage folders (Crop___Disease or crop_disease), chosen crops, copies skipped",
        metadata={"params": {"crops": "list of crops to keep (default: all)", "dedupe": "skip exact copies"}},
    )
