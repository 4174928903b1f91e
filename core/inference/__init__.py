"""The torch-free inference engine shared by the REST service, ``thali evaluate`` of a registry model and
``thali bench``: preprocessing from ``preprocess.json`` (numpy + OpenCV), postprocessing (temperature,
top-k, the unknown flag, class-activation heatmaps), the micro-batcher, and the serving-backend
contract. Nothing here imports torch, albumentations or training code."""

from .backend import CAPABILITIES, PredictOnlyAdapter, ServingBackend, load_backend
from .batcher import BatcherClosed, MicroBatcher
from .postprocess import Prediction, predictions, softmax
from .preprocess import Preprocessor

__all__ = [
    "CAPABILITIES",
    "BatcherClosed",
    "MicroBatcher",
    "PredictOnlyAdapter",
    "Prediction",
    "Preprocessor",
    "ServingBackend",
    "load_backend",
    "predictions",
    "softmax",
]
