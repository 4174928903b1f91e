"""The ``onnxruntime`` serving backend: one InferenceSession per loaded variant, on the best execution
provider present (TensorRT, CUDA, then CPU), reporting the provider that really ran the nodes: ONNX
Runtime falls back to CPU silently, so the first run is profiled and the placement read back.
``thali bench`` builds its ONNX rows through this backend too."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import DataError, NotAvailableError, one_line
from thali.core.export import CAM, FEATURES, LOGITS, STAGE_FEATURES
from thali.core.inference.providers import PREFERRED_PROVIDERS
from thali.core.registry import Registry


def provider_chain(provider: str | None = None) -> list[str]:
    """``provider`` (with CPU behind it), or every preferred provider this build offers."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider:
        if provider not in available:
            raise NotAvailableError(f"{provider} is not available in this onnxruntime build ({available})")
        return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OnnxRuntimeBackend:
    """``predict(batch)``, ``explain(batch)`` when the model has a ``cam`` output, ``infer(batch, cam)``
    (logits and the ``features`` output the unknown score reads), ``info()``."""

    #: ``InferenceSession.run`` is thread-safe: the server runs up to ``engine_workers`` batches at once
    concurrent_runs = True

    def __init__(
        self,
        model_path: str | Path,
        *,
        provider: str | None = None,
        threads: int | None = None,
        spinning: bool = False,
        variant: str | None = None,
        **_: Any,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(model_path)
        self.variant = variant
        providers = provider_chain(provider)
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):  # CUDA/cuDNN from nvidia-* wheels; else the session says
                ort.preload_dlls()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spinning:  # idle engine threads sleep instead of spinning: less CPU at low load, a little
            # more latency (measured: 1.84 -> 1.19 cores, server p50 12.2 -> 14.8 ms at concurrency 1)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"thali-serve-{os.getpid()}")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise DataError(f"{self.path.name}: ONNX Runtime cannot load it ({one_line(exc, 200)})") from None
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.has_cam = CAM in self.outputs
        self.has_features = FEATURES in self.outputs
        self.has_stages = self.has_features and STAGE_FEATURES in self.outputs
        self.logits_name = LOGITS if LOGITS in self.outputs else self.outputs[0]
        #: read from the model's outputs: the server knows what this backend gives without running it
        self.capabilities = frozenset(
            name
            for name, present in (
                (CAM, self.has_cam),
                (FEATURES, self.has_features),
                (STAGE_FEATURES, self.has_stages),
            )
            if present
        )
        import numpy as np

        shape = inputs[0].shape
        sample = np.zeros((1, *[d if isinstance(d, int) else 1 for d in shape[1:]]), dtype=np.float32)
        self.nodes_by_provider = self._placement(sample)
        self.requested = providers

    def _placement(self, sample: Any) -> dict[str, int]:
        """Run once under the profiler and count the nodes each provider ran (then profiling stops)."""
        self.session.run(None, {self.input_name: sample})
        profile = Path(self.session.end_profiling())
        placement: Counter[str] = Counter()
        try:
            for event in json.loads(profile.read_text()):
                if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
                    placement[event.get("args", {}).get("provider", "?")] += 1
        finally:
            profile.unlink(missing_ok=True)
        return dict(placement)

    @property
    def provider_used(self) -> str:
        """The provider that ran most nodes (``CPUExecutionProvider`` when CUDA fell back entirely)."""
        if not self.nodes_by_provider:
            return self.requested[0]
        return max(self.nodes_by_provider.items(), key=lambda kv: kv[1])[0]

    def predict(self, batch: Any) -> Any:
        return self.session.run([self.logits_name], {self.input_name: batch})[0]

    def explain(self, batch: Any) -> tuple[Any, Any]:
        if not self.has_cam:
            raise NotAvailableError("this model was exported without a heatmap output (export.explain)")
        logits, cam = self.session.run([self.logits_name, CAM], {self.input_name: batch})
        return logits, cam

    def run(self, batch: Any, outputs: frozenset[str]) -> dict[str, Any]:
        """``logits`` and each of ``outputs`` (a subset of ``capabilities``), from one session run."""
        names = [self.logits_name, *(n for n in (FEATURES, STAGE_FEATURES, CAM) if n in outputs)]
        values = self.session.run(names, {self.input_name: batch})
        return dict(zip([LOGITS, *names[1:]], values, strict=True))

    def infer(self, batch: Any, cam: bool = False) -> dict[str, Any]:
        """Every output a request needs, in one run: ``logits``, ``features`` and ``stage_features`` when
        the model has them (the unknown score), ``cam`` when asked for and available."""
        wanted = self.capabilities if cam else self.capabilities - {CAM}
        return self.run(batch, wanted)

    def info(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime",
            "variant": self.variant,
            "file": self.path.name,
            "provider": self.provider_used,
            "providers_requested": self.requested,
            "nodes_by_provider": self.nodes_by_provider,
            "fell_back_to_cpu": self.requested[0] != "CPUExecutionProvider"
            and self.provider_used == "CPUExecutionProvider",
            "explain": self.has_cam,
            "features": self.has_features,
        }


@hookimpl
def thali_register_serving_backends(registry: Registry[Any]) -> None:
    registry.add(
        "onnxruntime",
        OnnxRuntimeBackend,
        description="ONNX Runtime; TensorRT/CUDA when present, reports the provider that really ran",
    )
