"""The ``torch`` serving backend: a development backend for a training run folder at hand.

It runs the training checkpoint a package was exported from, eagerly. The package names that run only by
id and hash (``lineage.run_id``, ``lineage.checkpoint_sha256``: a package never holds a machine's
folders), so the run folder comes from the ``run_dir`` parameter (``thali evaluate --run``,
``thali serve --torch-run``), else from ``$THALI_RUNS/DOMAIN/RUN_ID`` or ``runs/DOMAIN/RUN_ID`` (where
``thali train`` writes it); its ``best.pt`` must have the recorded sha256. Otherwise it says to use the
``onnxruntime`` backend. Torch and the training code are imported inside the factory, so registering it
costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thali.core import hookimpl
from thali.core.errors import DataError, IntegrityError, NotAvailableError
from thali.core.export import CAM, FEATURES, LOGITS, STAGE_FEATURES
from thali.core.manifest import default_run_folder
from thali.core.registry import Registry

USE_ONNX = "serve it with the onnxruntime backend"


def _checkpoint(package: Any, run_dir: str | Path | None) -> Path:
    """The package's training checkpoint, checked against the sha256 recorded at export."""
    from thali.core.exporting.pipeline import sha256

    name = f"{package.domain} v{package.version}"
    lineage = package.manifest.lineage
    expected = lineage.checkpoint_sha256
    if not expected:
        raise NotAvailableError(f"{name}: its manifest names no training checkpoint; {USE_ONNX}")
    if run_dir is None:
        run_dir = default_run_folder(package.domain, lineage.run_id)
        if run_dir is None:
            raise NotAvailableError(f"{name}: no run folder given (run_dir) and no run id; {USE_ONNX}")
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise NotAvailableError(
            f"{name}: its training checkpoint {path} is not at hand (the torch backend is for a run folder "
            f"on this machine: pass run_dir); {USE_ONNX}"
        )
    if sha256(path) != expected:
        raise IntegrityError(
            f"{path} is not the checkpoint {name} was exported from (sha256 differs); {USE_ONNX}"
        )
    return path


class TorchBackend:
    """``run(batch, outputs)``, ``predict(batch)``, ``explain(batch)``, ``infer(batch, cam)`` and
    ``info()`` on the package's fp32 training checkpoint."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        package: Any,
        registries: Any,
        device: str = "auto",
        variant: str | None = None,
        run_dir: str | Path | None = None,
        **_: Any,
    ) -> None:
        if variant not in (None, "fp32"):
            raise NotAvailableError(
                f"the torch backend runs the fp32 checkpoint, not {variant!r}; {USE_ONNX}"
            )
        self.checkpoint = _checkpoint(package, run_dir)
        import torch

        from thali.core.inference.unknown import load_spec
        from thali.core.training.evaluate import load_run
        from thali.core.training.onnx import ServingOutputs, WithCam

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise NotAvailableError(f"device {device!r}: CUDA is not available to torch here")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.torch = torch
        self.model = load_run(self.checkpoint.parent, registries).model.to(self.device).eval()
        self.with_cam = WithCam(self.model).eval()
        # the stages the package's unknown score reads, from its checked spec
        score = load_spec(getattr(package, "calibration", None) or {})
        stages = [layer.stage for layer in score.layers] if score is not None else []
        try:  # ServingOutputs refuses a stage the checkpoint's backbone lacks
            self.outputs = {
                flag: ServingOutputs(self.model, cam=flag, stages=stages).eval() for flag in (False, True)
            }
        except ValueError as exc:
            raise DataError(f"calibration.json unknown.layers: {exc}") from None
        self.names = [LOGITS, FEATURES, *([STAGE_FEATURES] if stages else [])]
        self.capabilities = frozenset({FEATURES, CAM, *([STAGE_FEATURES] if stages else [])})
        self.variant = variant or "fp32"

    def _input(self, batch: Any) -> Any:
        import numpy as np

        return self.torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)

    def predict(self, batch: Any) -> Any:
        with self.torch.inference_mode():
            return self.model(self._input(batch)).float().cpu().numpy()

    def explain(self, batch: Any) -> tuple[Any, Any]:
        """Logits and class-activation maps ``(N, K, h, w)``, computed as ``export.explain`` exports them."""
        with self.torch.inference_mode():
            logits, cam = self.with_cam(self._input(batch))
            return logits.float().cpu().numpy(), cam.float().cpu().numpy()

    def infer(self, batch: Any, cam: bool = False) -> dict[str, Any]:
        """Logits, the penultimate ``features`` and ``stage_features`` (the unknown score) and, if asked,
        ``cam``: the outputs an export of this checkpoint has."""
        with self.torch.inference_mode():
            values = self.outputs[bool(cam)](self._input(batch))
        names = [*self.names, CAM][: len(values)]
        return {n: v.float().cpu().numpy() for n, v in zip(names, values, strict=True)}

    def run(self, batch: Any, outputs: frozenset[str]) -> dict[str, Any]:
        """``logits`` and ``outputs`` (a subset of ``capabilities``)."""
        if not outputs:
            return {LOGITS: self.predict(batch)}
        return self.infer(batch, cam=CAM in outputs)

    def info(self) -> dict[str, Any]:
        return {
            "backend": "torch",
            "variant": self.variant,
            "provider": str(self.device),
            "explain": True,
            "features": True,
            "checkpoint": str(self.checkpoint),
        }


@hookimpl
def thali_register_serving_backends(registry: Registry[Any]) -> None:
    registry.add(
        "torch",
        TorchBackend,
        description="development: PyTorch eager on the training run folder at hand; CUDA when present",
    )
