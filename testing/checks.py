"""What the per-kind check modules share: the check record, its two outcomes other than "passed", and the
helpers that need torch (imported inside them, never at module level)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: How thali names the install extra that brings torch and the ONNX exporter.
TRAIN_EXTRA = "pip install 'thali[train]'"
#: Imports of the ``train`` extra: a check that cannot import one of them is skipped, not failed.
TRAIN_MODULES = frozenset(
    {"torch", "torchvision", "timm", "albumentations", "onnx", "onnxscript", "tensorboard"}
)
TORCH: tuple[str, ...] = ("torch",)
ONNX: tuple[str, ...] = ("torch", "onnx", "onnxscript")
#: The opset thali exports with (``thali.core.training.onnx.export_onnx``, ``export.opset``).
OPSET = 18


class CheckFailed(Exception):
    """A check found the component does not conform; the message is the report's detail, as is."""


class CheckSkipped(Exception):
    """A check could not run here (a missing extra, nothing to check); the message says why."""


@dataclass(frozen=True)
class Check:
    """One named check. ``run`` returns the detail of a pass, or raises. ``needs``: import names of the
    ``train`` extra it cannot run without."""

    name: str
    run: Callable[[], str | None]
    needs: tuple[str, ...] = ()


def params_of(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``params`` option: extra keyword arguments for the component's factory."""
    params = options.get("params") or {}
    if not isinstance(params, Mapping):
        raise TypeError(f"option params must be a mapping, got {type(params).__name__}")
    return dict(params)


def needed(state: dict[str, Any], key: str, what: str) -> Any:
    """``state[key]``, set by an earlier check of the same component; a skip naming it otherwise."""
    if key not in state:
        raise CheckSkipped(f"not run: {what} did not succeed")
    return state[key]


def shape(value: Any) -> str:
    """``(2, 3, 64, 64)`` for a tensor or array; the type name for anything else."""
    dims = getattr(value, "shape", None)
    return str(tuple(int(d) for d in dims)) if dims is not None else type(value).__name__


def require_module(value: Any, what: str) -> Any:
    """``value`` if it is a ``torch.nn.Module``."""
    from torch import nn

    if not isinstance(value, nn.Module):
        raise CheckFailed(f"{what} returned {type(value).__name__}, not a torch.nn.Module")
    return value


def gradient_report(module: Any) -> str:
    """Fail when a trainable parameter got no gradient or a non-finite one; else a one-line summary.

    Every parameter must take part: thali trains with DistributedDataParallel, which stops on unused
    parameters."""
    import torch

    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    if missing:
        raise CheckFailed(
            f"{len(missing)} of {len(trainable)} trainable parameter tensors got no gradient "
            f"(first: {missing[0]}); every parameter must be used (DistributedDataParallel needs it)"
        )
    broken = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    if broken:
        raise CheckFailed(f"non-finite gradient in {len(broken)} parameter tensors (first: {broken[0]})")
    return f"gradients reach all {len(trainable)} trainable parameter tensors"


def perturb(module: Any, scale: float = 0.05) -> None:
    """Add small noise to every parameter, so that zero-initialised parts (a gate that starts as the
    identity) take part in the parity check."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def onnx_parity(module: Any, batches: Sequence[Any], tolerance: float) -> str:
    """Export ``module`` (eval mode) with thali's own helper (dynamo, opset 18, dynamic batch) from the
    first batch, run every batch in ONNX Runtime and compare with torch.

    The largest difference may be ``tolerance`` times the largest torch output: an untrained network's
    outputs can be tiny (thali's se_cnn gives about 1e-5), and an absolute tolerance would pass anything."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from thali.core.errors import one_line
    from thali.core.training.onnx import export_onnx

    module.eval()
    with tempfile.TemporaryDirectory(prefix="thali-check-") as tmp:
        path = Path(tmp) / "component.onnx"
        try:
            export_onnx(module, batches[0], path, opset=OPSET)
        except Exception as exc:
            raise CheckFailed(f"ONNX export (opset {OPSET}) failed: {one_line(exc)}") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckFailed(f"ONNX Runtime cannot load the export: {one_line(exc)}") from None
        name = session.get_inputs()[0].name
        worst = largest = 0.0
        for batch in batches:
            try:
                got = session.run(None, {name: batch.numpy()})[0]
            except Exception as exc:
                raise CheckFailed(f"ONNX Runtime failed at batch {len(batch)}: {one_line(exc)}") from None
            with torch.no_grad():
                ref = module(batch).numpy()
            if got.shape != ref.shape:
                raise CheckFailed(f"ONNX Runtime gives {got.shape} at batch {len(batch)}, torch {ref.shape}")
            diff = float(np.abs(got - ref).max()) if got.size else 0.0
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            if not np.isfinite(got).all() or diff > tolerance * max(scale, 1e-12):
                raise CheckFailed(
                    f"ONNX Runtime differs from torch at batch {len(batch)}: max abs diff {diff:.2e}, "
                    f"outputs up to {scale:.2e} (tolerance {tolerance:g} of that)"
                )
            worst, largest = max(worst, diff), max(largest, scale)
    sizes = " and ".join(str(len(b)) for b in batches)
    return (
        f"opset {OPSET}, batch {sizes}: max abs diff {worst:.1e}, outputs up to {largest:.1e} "
        f"(tolerance {tolerance:g} of that)"
    )
