"""TensorBoard logging of one epoch: scalars, per-class accuracy and the confusion-matrix image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from thali.core.metrics import confusion_image

SCALARS = (
    ("train_loss", "loss/train"),
    ("val_loss", "loss/val"),
    ("train_top1", "top1/train"),
    ("val_top1", "top1/val"),
    ("val_top5", "top5/val"),
    ("lr", "lr"),
    ("images_per_s", "images_per_s"),
)


def write_epoch(writer: Any, record: dict[str, float], val: dict[str, Any], classes: Sequence[str]) -> None:
    step = int(record["epoch"])
    for key, tag in SCALARS:
        writer.add_scalar(tag, record[key], step)
    if "val_cross_top1" in record:  # held-out collections: measured every epoch, never chosen on
        writer.add_scalar("top1/val_cross", record["val_cross_top1"], step)
    for name, stats in val["per_class"].items():
        writer.add_scalar(f"class_accuracy/{name}", stats["recall"], step)
    cm = np.asarray(val["confusion_matrix"])
    writer.add_image("confusion_matrix/val", confusion_image(cm, list(classes)), step, dataformats="HWC")
    writer.flush()
