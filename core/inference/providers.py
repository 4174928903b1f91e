"""ONNX Runtime execution providers in the order thali prefers them when several are present: the one
list (and short names) the serving backend and ``thali bench`` both read."""

from __future__ import annotations

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
#: how answers, logs and bench tables name them
SHORT = {
    "TensorrtExecutionProvider": "TensorRT",
    "CUDAExecutionProvider": "CUDA",
    "CPUExecutionProvider": "CPU",
}
