"""ONNX Runtime execution providers in the order thali prefers them when several are present: the one
list the serving backend and ``thali bench`` both read."""

from __future__ import annotations

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
