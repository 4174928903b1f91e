"""What each kind of factory returns: one Protocol per component kind.

``Registries`` holds one ``Registry[<Protocol>]`` per kind and each registration hook is typed with it,
so a plugin author's type checker (and thali's mypy run) checks a factory against the contract its
hookspec describes. The Protocols say what thali *calls*; the hookspec docstrings say the rest (shapes,
when it is called, what a mistake costs). Torch types stay out of the signatures so that importing this
module costs nothing.

- ``datasets``: ``factory(root, classes=None, **params)`` returns :class:`LabelledSamples`
- ``backbones``: ``factory(num_classes=0, pretrained=..., **params)`` returns :class:`Backbone`
- ``attention``: ``factory(channels, **params)`` returns :class:`AttentionModule`
- ``losses``: ``factory(num_classes, class_counts=None, **params)`` returns :class:`Loss`
- ``exporters``: ``factory(**params)`` returns :class:`thali.core.export.Exporter`
- ``serving_backends``: ``factory(model_path, **params)`` returns :data:`AnyServingBackend`
- ``domains``: ``factory()`` returns :class:`thali.core.domains.DomainPack`
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from .inference.backend import ServingBackend

__all__ = [
    "AnyServingBackend",
    "AttentionModule",
    "Backbone",
    "LabelledSamples",
    "Loss",
    "PredictOnlyBackend",
]


@runtime_checkable
class LabelledSamples(Protocol):
    """A dataset reader's result: class names, ``(path, class_index)`` samples, and the unreadable files
    it found (reported and skipped, never raised mid-epoch)."""

    @property
    def classes(self) -> Sequence[str]: ...

    @property
    def samples(self) -> Sequence[tuple[Path, int]]: ...

    @property
    def problems(self) -> Sequence[tuple[Path, str]]: ...


class Backbone(Protocol):
    """A ``torch.nn.Module`` mapping ``(N, 3, H, W)`` images to ``(N, C, h, w)`` feature maps, with
    ``num_features`` (``C``); or a :class:`thali.core.FeatureBackbone`."""

    def __call__(self, images: Any, /) -> Any: ...


class AttentionModule(Protocol):
    """A ``torch.nn.Module`` whose output has the shape of its ``(N, channels, H, W)`` input."""

    def __call__(self, features: Any, /) -> Any: ...


class Loss(Protocol):
    """``loss(logits, target) -> scalar tensor``: a function or a ``torch.nn.Module``."""

    def __call__(self, logits: Any, target: Any, /) -> Any: ...


class PredictOnlyBackend(Protocol):
    """A serving backend written to the first contract: ``predict`` and ``info`` (optionally
    ``explain``/``infer``); the server wraps it (:class:`thali.core.inference.PredictOnlyAdapter`)."""

    def predict(self, batch: Any, /) -> Any: ...

    def info(self) -> dict[str, Any]: ...


#: What a serving-backend factory may return: a :class:`thali.core.inference.ServingBackend`
#: (``run`` + ``capabilities``) or a :class:`PredictOnlyBackend`; which one is checked when the backend
#: is built (:func:`thali.core.inference.load_backend`).
AnyServingBackend: TypeAlias = "ServingBackend | PredictOnlyBackend"
