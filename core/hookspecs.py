"""The contract between thali and its plugins: every hook, in one module.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` whose names match the
specs below. Built-in plugins are listed in ``thali.core.plugins.DEFAULT_PLUGINS``; third-party packages
are found through the entry-point group ``thali``::

    [project.entry-points.thali]
    my_plugin = "my_package.thali_plugin"

Registration hooks are called once, when the plugin manager is built, in plugin registration order
(built-ins first, then entry points sorted by name). Each is handed the :class:`~thali.core.registry.Registry`
of its kind and calls ``registry.add(name, factory, description=..., metadata=...)``. Registering must be
cheap: import heavy libraries (torch, timm, onnxruntime, albumentations) inside the factory, never at
module top level, so that ``thali plugins`` answers in about a second and an ONNX-only server never
loads torch. A name already taken by another plugin is an error naming both plugins.

A plugin that implements a hook name not listed here is rejected when the manager is built (a misspelt
hook would otherwise be silently ignored).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .contracts import AnyServingBackend, AttentionModule, Backbone, LabelledSamples, Loss
    from .domains import DomainPack
    from .export import Exporter
    from .registry import Registry

PROJECT_NAME = "thali"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorate a plugin's hook functions with this: ``from thali.core import hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def thali_register_datasets(registry: Registry[LabelledSamples]) -> None:
    """Register dataset readers.

    Called once when the plugin manager is built. Add one entry per reader. The factory is called as
    ``factory(root, classes=None, **params)`` with ``root`` the data location (folder or manifest file) and
    ``params`` the ``dataset.params`` of the domain config; it returns an object with ``classes``
    (list of class names), ``samples`` (list of ``(path, class_index)``) and ``problems`` (unreadable files
    found, reported and skipped, never raised mid-epoch).
    """


@hookspec
def thali_register_backbones(registry: Registry[Backbone]) -> None:
    """Register image backbones.

    Called once when the plugin manager is built. The factory is called as
    ``factory(num_classes=0, pretrained="none", **params)`` (``params``: ``model.params`` of the domain
    config, plus ``drop_path_rate`` when set) and returns a ``torch.nn.Module`` that maps
    ``(N, 3, H, W)`` images to ``(N, C, h, w)`` feature maps and exposes ``num_features`` (``C``).
    ``pretrained`` is ``"none"``, a named weight source listed in the entry's ``metadata["weights"]``,
    or a path to a local checkpoint. Entry metadata must carry the preprocessing the weights expect:
    ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation`` (``nearest``, ``bilinear``,
    ``bicubic``, ``area`` or ``lanczos``: training and serving resample alike), ``crop_pct``, plus
    ``weights`` and ``licence``: it travels with the model into the model package, so nothing
    downstream hard-codes 224.

    Two shapes are accepted:

    * **a plain module** (the above): thali treats it as one stage. Training it whole (``training.mode:
      full``) or not at all (``trainable_stages: 0``, a linear probe on cached features) works; partial
      freezing and attention *between* stages have nothing to hold on to, and thali says so.
    * **a** :class:`thali.core.FeatureBackbone` ``(stem, stages, head, num_features, stage_channels,
      preprocess)``: use it when the network has stages worth freezing separately (the built-in
      EfficientNets): ``training.trainable_stages`` then trains only the last stages, ``frozen_features``
      caches the frozen prefix once, and attention can go after any stage.

    Before training, thali runs one small batch through it: anything else (not a module, no integer
    ``num_features``, output not ``(N, num_features, h, w)``, an exception) is one error line naming the
    component, the plugin and its distribution.
    """


@hookspec
def thali_register_attention(registry: Registry[AttentionModule]) -> None:
    """Register attention modules.

    Called once when the plugin manager is built. The factory is called as
    ``factory(channels, **params)`` and returns a ``torch.nn.Module`` whose output has the same shape as
    its ``(N, channels, H, W)`` input. Modules must export to ONNX (opset >= 18): no adaptive max pooling,
    export-safe activations. The domain config places them on the last feature map or after stages.
    """


@hookspec
def thali_register_losses(registry: Registry[Loss]) -> None:
    """Register training losses.

    Called once when the plugin manager is built. The factory is called as
    ``factory(num_classes, class_counts=None, **params)`` (``class_counts``: training images per class,
    for re-weighting losses; ``params``: ``loss.params`` of the config, plus ``label_smoothing`` when the
    factory accepts it) and returns a callable ``loss(logits, target) -> scalar tensor``: a plain
    function or a ``torch.nn.Module`` (whose buffers then move to the training device with the model).
    ``target`` is class indices or, under mixup/cutmix, a ``(N, num_classes)`` probability matrix.
    thali calls it once on a tiny batch before training; an exception or a non-scalar result is one
    error line naming the component and its plugin.
    """


@hookspec
def thali_register_exporters(registry: Registry[Exporter]) -> None:
    """Register model exporters and optimisers (ONNX export, graph optimisation, quantisation, fp16).

    Called once when the plugin manager is built. The factory is called as ``factory(**params)`` and
    returns an object whose ``run(context)`` takes a :class:`thali.core.export.ExportContext`, writes
    one model variant into ``context.out_dir``, records it in ``context.artifacts`` and returns a
    report (a JSON-able dict). Every published variant must pass the accuracy gate.
    """


@hookspec
def thali_register_serving_backends(registry: Registry[AnyServingBackend]) -> None:
    """Register serving backends (ONNX Runtime, torch, ...).

    Called once when the plugin manager is built. The factory is called as
    ``factory(model_path, **params)``; ``params`` always include ``variant`` (the package variant being
    served), ``package`` (the verified :class:`thali.core.manifest.ModelPackage`: its typed ``manifest``,
    ``labels``, ``preprocess``, ``calibration`` and verified ``files``) and ``registries``, and for the
    server ``threads`` (the CPU threads one ``run`` may use) and ``spinning`` (whether idle engine threads
    may spin); a backend takes what it needs and ignores the rest (``**params``). The server calls
    ``run`` from one thread at a time unless the backend has ``concurrent_runs = True`` (a class
    attribute): then from up to ``engine_workers`` threads at once (the ONNX Runtime backend does).

    It returns a :class:`thali.core.inference.ServingBackend`: ``capabilities`` (which of ``features``,
    ``stage_features``, ``cam`` it gives besides ``logits``: the server decides from them at load time,
    it never probes), ``run(batch, outputs) -> dict`` for a preprocessed ``float32`` batch
    ``(N, 3, H, W)``, and ``info() -> dict`` (the provider actually used). A backend written to the
    first contract, ``predict(batch) -> logits`` and ``info()`` (optionally ``explain(batch) -> (logits,
    cam)``, ``infer(batch, cam=False) -> dict``), still works: the server wraps it
    (:class:`thali.core.inference.PredictOnlyAdapter`). An ONNX backend must not import training code.
    """


@hookspec
def thali_register_domains(registry: Registry[DomainPack]) -> None:
    """Register domain packs.

    Called once when the plugin manager is built. The factory takes no arguments and returns a
    :class:`thali.core.domains.DomainPack` (name, folder, path of its ``domain.yaml``). Use
    :func:`thali.core.domains.register_domain_dir` to register a folder that holds a ``domain.yaml``.
    A domain can reference components registered by any plugin, its own included.
    """
