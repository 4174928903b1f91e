"""The serving-backend contract (``thali_register_serving_backends``) and the one place that builds a
backend for a model package, checking what a plugin returned."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from thali.core.errors import PluginError, ThaliError
from thali.core.registry import Registries


@runtime_checkable
class ServingBackend(Protocol):
    """What a serving-backend factory returns.

    ``predict(batch)``: logits ``(N, K)`` float32 for a preprocessed float32 batch ``(N, 3, H, W)``.
    ``info()``: a JSON-able dict; ``backend``, ``variant``, ``provider`` (the execution provider that
    really ran the model's nodes, not merely the one asked for) and ``explain`` (bool) are shown by the
    API. Optional ``explain(batch)``: ``(logits, cam)`` with ``cam`` ``(N, K, h, w)`` class-activation
    maps, for models exported with ``export.explain: true``. Optional ``infer(batch, cam=False)``: a dict
    of every output one run gives, ``logits`` always, ``features`` ``(N, C)`` (the pooled penultimate
    features every thali export has; the package's unknown score reads them, so without them the
    unknown flag falls back to the top probability), ``stage_features`` ``(N, S)`` when the model has
    that output (an unknown score with layers reads it; without it that score is not used either) and
    ``cam`` when ``cam`` is true and the model has it; when present, the server calls it instead of
    ``predict``/``explain``. Must be safe to call from one thread at a time (the micro-batcher's); it is
    never called concurrently."""

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


def load_backend(registries: Registries, name: str, model_path: Path, /, **params: Any) -> ServingBackend:
    """Build serving backend ``name`` for ``model_path``; a plugin's broken result is one PluginError."""
    entry = registries.serving_backends.get(name)
    backend = registries.serving_backends.create(name, model_path, **params)
    if not callable(getattr(backend, "predict", None)) or not callable(getattr(backend, "info", None)):
        raise PluginError(
            f"serving backend {name!r} (plugin {entry.plugin!r}) returned {type(backend).__name__}, "
            "which has no predict(batch) and info() (see thali_register_serving_backends)"
        )
    try:
        info = backend.info()
    except ThaliError:
        raise
    except Exception as exc:
        raise PluginError(
            f"serving backend {name!r} (plugin {entry.plugin!r}): info() raised {exc!r}"
        ) from exc
    if not isinstance(info, dict):
        raise PluginError(f"serving backend {name!r} (plugin {entry.plugin!r}): info() must return a dict")
    return backend
