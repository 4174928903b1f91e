"""Which commands need which install extra: the base install serves, ``thali[train]`` trains."""

from __future__ import annotations

import importlib.util

from thali.core.errors import NotAvailableError

# The modules of the `train` extra that the training engine imports (onnx/onnxscript only at export).
TRAIN_MODULES = ("torch", "timm", "albumentations", "onnx")


def require_train(command: str) -> None:
    """One line naming the extra when ``thali COMMAND`` runs in a serving-only install."""
    missing = [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise NotAvailableError(
            f"`thali {command}` needs the training extra ({', '.join(missing)} not installed): "
            "pip install 'thali[train]'"
        )
