"""The serving-backend contract (``thali_register_serving_backends``) and the one place that builds a
backend for a model package, checking what a plugin returned."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np

from thali.core.errors import PluginError, ThaliError
from thali.core.export import CAM, FEATURES, LOGITS, STAGE_FEATURES
from thali.core.registry import Registries

#: What a backend may give besides ``logits`` (the names of a thali model's outputs).
CAPABILITIES: frozenset[str] = frozenset({FEATURES, STAGE_FEATURES, CAM})


@runtime_checkable
class ServingBackend(Protocol):
    """What the server runs: one call per batch, and what it can give declared up front.

    ``capabilities``: the outputs it can give besides ``logits``, a subset of :data:`CAPABILITIES`:
    ``features`` ``(N, C)`` (the pooled penultimate features every thali export has; the package's
    unknown score reads them, so without them the unknown flag falls back to the top probability),
    ``stage_features`` ``(N, S)`` (an unknown score with layers reads them; without them that score is
    not used either), ``cam`` ``(N, K, h, w)`` class-activation maps (models exported with
    ``export.explain: true``). The server decides from this set at load time; it never probes.

    ``run(batch, outputs)``: for a preprocessed float32 batch ``(N, 3, H, W)``, a dict with ``logits``
    ``(N, K)`` float32 and every name of ``outputs`` (always a subset of ``capabilities``).

    ``info()``: a JSON-able dict; ``backend``, ``variant``, ``provider`` (the execution provider that
    really ran the model's nodes, not merely the one asked for) and ``explain`` (bool) are shown by the
    API. Both are called from one thread at a time (the micro-batcher's), never concurrently.

    A plugin may instead return a *predict-only* object: ``predict(batch) -> logits`` and ``info()``,
    optionally ``explain(batch) -> (logits, cam)`` and ``infer(batch, cam=False) -> dict`` and a
    ``capabilities`` attribute; :func:`load_backend` wraps it in :class:`PredictOnlyAdapter`."""

    capabilities: frozenset[str]

    def run(self, batch: np.ndarray, outputs: frozenset[str]) -> dict[str, np.ndarray]: ...

    def info(self) -> dict[str, Any]: ...


class PredictOnlyAdapter:
    """A :class:`ServingBackend` over a backend written to the predict/explain/infer contract.

    Its capabilities are what the wrapped object declares (a ``capabilities`` attribute), else what
    its methods and ``info()`` say: ``cam`` with a callable ``explain`` and ``info()["explain"]``,
    ``features`` with a callable ``infer`` unless ``info()["features"]`` is false. ``stage_features``
    only when declared."""

    def __init__(self, inner: Any, info: dict[str, Any]) -> None:
        self.inner = inner
        self._explain = callable(getattr(inner, "explain", None))
        self._infer = callable(getattr(inner, "infer", None))
        declared = getattr(inner, "capabilities", None)
        if declared is not None:
            self.capabilities = frozenset(declared) & CAPABILITIES
        else:
            caps = {CAM} if self._explain and info.get("explain") else set()
            if self._infer and info.get("features") is not False:
                caps.add(FEATURES)
            self.capabilities = frozenset(caps)

    def run(self, batch: np.ndarray, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        cam = CAM in outputs
        if self._infer and (outputs - {CAM} or (cam and not self._explain)):
            return dict(self.inner.infer(batch, cam=cam))
        if cam:
            logits, cams = self.inner.explain(batch)
            return {LOGITS: logits, CAM: cams}
        return {LOGITS: self.inner.predict(batch)}

    def info(self) -> dict[str, Any]:
        return dict(self.inner.info())

    def __getattr__(self, name: str) -> Any:  # predict, explain, … of the wrapped backend
        return getattr(self.inner, name)


def load_backend(registries: Registries, name: str, model_path: Path, /, **params: Any) -> ServingBackend:
    """Build serving backend ``name`` for ``model_path``; a plugin's broken result is one PluginError.

    What comes back always has ``run`` and ``capabilities``: a predict-only backend is wrapped."""
    entry = registries.serving_backends.get(name)
    backend = registries.serving_backends.create(name, model_path, **params)
    native = callable(getattr(backend, "run", None)) and getattr(backend, "capabilities", None) is not None
    if not (native or callable(getattr(backend, "predict", None))) or not callable(
        getattr(backend, "info", None)
    ):
        raise PluginError(
            f"serving backend {name!r} (plugin {entry.plugin!r}) returned {type(backend).__name__}, "
            "which has neither run(batch, outputs) nor predict(batch), or no info() "
            "(see thali_register_serving_backends)"
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
    if not native:
        return PredictOnlyAdapter(backend, info)
    backend = cast(ServingBackend, backend)
    extra = set(backend.capabilities) - CAPABILITIES
    if extra:
        raise PluginError(
            f"serving backend {name!r} (plugin {entry.plugin!r}) declares capabilities {sorted(extra)}; "
            f"known: {sorted(CAPABILITIES)}"
        )
    return backend
