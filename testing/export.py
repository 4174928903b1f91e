"""Checks of exporters and serving backends, on a tiny classifier made here (no training needed).

Exporter (``thali_register_exporters``): ``factory(**params)`` returns an object with ``run(context)``
and an optional ``produces`` (a variant name, or ``None`` for the steps that make the fp32 model). The
round trip runs it as ``thali export`` does: after the fp32 steps (``onnx``, ``ort_optimize``, made once
and copied into each check's own folder), on a :class:`~thali.core.export.ExportContext` with the tiny
classifier, an example batch and a calibration batch. It must return a JSON-able report and record
files in ``context.artifacts`` (``artifacts[produces]`` for a variant) that ONNX Runtime runs to
logits of the right shape; fp32 files must match torch within the tolerance.

Serving backend (``thali_register_serving_backends``): ``factory(model_path, variant="fp32",
package=..., registries=...)`` on the tiny classifier exported with thali's helper; ``info()`` is a
JSON-able dict and ``predict(batch)`` gives float32 logits equal to torch's at two batch sizes; an
optional ``infer(batch, cam=False)`` gives a dict with those ``logits`` and the model's ``features`` (N,
C) (the exported ``features`` output the unknown flag reads). The
``package`` is a stand-in with the fields of :class:`thali.registry.ModelPackage` but no training
lineage: a backend that needs more (the torch backend needs the training checkpoint) says so with a
``NotAvailableError`` and the check is skipped with its message.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from thali.core.errors import NotAvailableError, ThaliError, one_line
from thali.core.names import is_valid_name
from thali.core.registry import Entry

from .checks import ONNX, Check, CheckFailed, CheckSkipped, needed, params_of, shape

EXPORTER_OPTIONS = frozenset({"params", "tolerance"})
SERVING_OPTIONS = frozenset({"params", "tolerance"})
#: The steps ``thali export`` runs first, in order (``thali.core.exporting.pipeline.FP32_STEPS``).
FP32_STEPS = ("onnx", "ort_optimize")
NUM_CLASSES, SIDE = 3, 32

_workdir: Path | None = None
_prepared: dict[int, tuple[Any, dict[str, Any]]] = {}


def _cache_dir() -> Path:
    """A folder for what the checks share in this process, removed at exit."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="thali-check-"))
        atexit.register(shutil.rmtree, _workdir, True)
    return _workdir


@lru_cache(maxsize=1)
def tiny_classifier() -> tuple[Any, Any]:
    """``(model, example)``: a small conv net from images to 3 logits (eval mode), and a
    ``(4, 3, 32, 32)`` batch. Deterministic; callers copy the model before handing it to a plugin."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, NUM_CLASSES),
        ).eval()
        example = torch.randn(4, 3, SIDE, SIDE)
    return model, example


def _with_features(model: Any) -> Any:
    """``x -> (logits, features)`` of the tiny classifier: its pooled features are what its last
    (linear) layer reads, as ``features`` is for a thali classifier."""
    from torch import nn

    class WithFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.fc = model[:-1], model[-1]

        def forward(self, x: Any) -> tuple[Any, Any]:
            features = self.body(x)
            return self.fc(features), features

    return WithFeatures().eval()


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _context(out_dir: Path) -> Any:
    from thali.core.export import ExportContext

    model, example = tiny_classifier()
    return ExportContext(
        model=copy.deepcopy(model),
        example=example.clone(),
        out_dir=out_dir,
        calibration=lambda: iter([example.numpy()]),
    )


def _prepared_steps(registries: Any) -> dict[str, Any]:
    """The fp32 steps run once per registries: ``{step: {artifact: path}}``, or ``{"error": why}``."""
    key = id(registries)
    if key not in _prepared:
        out = _cache_dir() / f"fp32-{len(_prepared)}"
        out.mkdir()
        context = _context(out)
        steps: dict[str, Any] = {}
        for step in FP32_STEPS:
            before = dict(context.artifacts)
            try:
                registries.exporters.create(step).run(context)
            except Exception as exc:
                steps = {
                    "error": f"the fp32 step {step!r} failed first: {getattr(exc, 'message', one_line(exc))}"
                }
                break
            steps[step] = {k: v for k, v in context.artifacts.items() if before.get(k) != v}
        _prepared[key] = (registries, steps)  # the registries are kept, so their id stays theirs
    return _prepared[key][1]


def exporter_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    params = params_of(options)
    tolerance = float(options.get("tolerance", 1e-3))

    def build() -> Any:
        exporter = entry.factory(**params)
        if not callable(getattr(exporter, "run", None)):
            raise CheckFailed(f"the factory returned {type(exporter).__name__}, which has no run(context)")
        produces = getattr(exporter, "produces", None)
        if produces is not None and not is_valid_name(produces):
            raise CheckFailed(f"produces {produces!r} is not a valid variant name (it becomes a file name)")
        return exporter

    def builds() -> str:
        exporter = build()
        produces = getattr(exporter, "produces", None)
        what = f"produces variant {produces!r}" if produces else "an fp32 step (produces None)"
        return f"{type(exporter).__name__}: {what}"

    def round_trip() -> str:
        import numpy as np

        before_steps = FP32_STEPS[: FP32_STEPS.index(entry.name)] if entry.name in FP32_STEPS else FP32_STEPS
        with tempfile.TemporaryDirectory(prefix="thali-check-") as tmp:
            out = Path(tmp)
            context = _context(out)
            if before_steps:
                steps = _prepared_steps(registries)
                if "error" in steps:
                    raise CheckSkipped(steps["error"])
                for step in before_steps:
                    for artifact, path in steps[step].items():
                        context.artifacts[artifact] = Path(shutil.copy2(path, out / Path(path).name))
            exporter = build()
            before = dict(context.artifacts)
            report = exporter.run(context)
            if not isinstance(report, dict):
                raise CheckFailed(f"run() returned {type(report).__name__}, not a report dict")
            try:
                json.dumps(report, default=float)
            except (TypeError, ValueError) as exc:
                raise CheckFailed(f"the report is not JSON-able: {one_line(exc)}") from None
            new = {k: Path(v) for k, v in context.artifacts.items() if before.get(k) != v}
            produces = getattr(exporter, "produces", None)
            if produces and produces not in new:
                raise CheckFailed(f"produces {produces!r} but recorded no context.artifacts[{produces!r}]")
            if not new:
                raise CheckFailed("run() recorded no file in context.artifacts")
            reference = context.torch_logits()
            parts = []
            for artifact, path in new.items():
                if not path.is_file():
                    raise CheckFailed(f"artifacts[{artifact!r}] = {path}: no such file")
                try:
                    path.resolve().relative_to(out.resolve())
                except ValueError:
                    raise CheckFailed(
                        f"artifacts[{artifact!r}] = {path} is outside context.out_dir"
                    ) from None
                try:
                    session = _session(path)
                    got = session.run(None, {session.get_inputs()[0].name: context.example.numpy()})[0]
                except Exception as exc:
                    raise CheckFailed(
                        f"ONNX Runtime cannot run artifacts[{artifact!r}]: {one_line(exc)}"
                    ) from None
                if got.shape != reference.shape:
                    raise CheckFailed(
                        f"artifacts[{artifact!r}] gives {shape(got)} logits, torch {shape(reference)}"
                    )
                if not np.isfinite(got).all():
                    raise CheckFailed(f"artifacts[{artifact!r}] gives NaN or infinite logits")
                diff = float(np.abs(got - reference).max())
                agree = float(np.mean(got.argmax(1) == reference.argmax(1)))
                if not produces and diff > tolerance:
                    raise CheckFailed(
                        f"fp32 artifact {artifact!r} differs from torch: max abs logit diff {diff:.2e} "
                        f"(tolerance {tolerance:g})"
                    )
                parts.append(
                    f"{artifact} ({path.name}): max abs logit diff {diff:.1e}, top-1 agreement {agree:.2f}"
                )
        return "; ".join(parts)

    return [Check("builds", builds), Check("round trip", round_trip, ONNX)]


@dataclass
class PackageStandIn:
    """The fields and methods of :class:`thali.registry.ModelPackage` for one fp32 file, without a
    card's lineage (no training run stands behind the tiny model)."""

    folder: Path
    domain: str = "conformance-check"
    version: int = 1
    files: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Any] = field(
        default_factory=lambda: {"classes": [{"name": f"class_{i}"} for i in range(NUM_CLASSES)]}
    )
    preprocess: dict[str, Any] = field(
        default_factory=lambda: {
            "input_size": [3, SIDE, SIDE],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        }
    )
    calibration: dict[str, Any] = field(
        default_factory=lambda: {"temperature": 1.0, "unknown_threshold": 0.0}
    )
    card: dict[str, Any] = field(default_factory=lambda: {"metrics": {"fp32": {}}, "lineage": {}})
    aliases: list[str] = field(default_factory=list)
    signed_by: str | None = None

    @property
    def variants(self) -> dict[str, Path]:
        return {"fp32": self.files["model.onnx"]}

    def model_path(self, variant: str = "fp32") -> Path:
        if variant not in self.variants:
            raise ThaliError(f"{self.domain} v{self.version} has no {variant!r} variant; it has fp32")
        return self.variants[variant]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.labels["classes"]]


@lru_cache(maxsize=1)
def tiny_onnx() -> Path:
    """The tiny classifier exported as ``thali export`` does (input ``input``, outputs ``logits`` and
    ``features``), once."""
    from thali.core.training.onnx import export_onnx

    model, example = tiny_classifier()
    folder = _cache_dir() / "serving"
    folder.mkdir(exist_ok=True)
    module = _with_features(copy.deepcopy(model))
    return export_onnx(module, example, folder / "model.onnx", output_names=["logits", "features"])


def serving_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    params = params_of(options)
    tolerance = float(options.get("tolerance", 1e-4))
    state: dict[str, Any] = {}

    def loads() -> str:
        path = tiny_onnx()
        package = PackageStandIn(folder=path.parent, files={"model.onnx": path})
        kwargs = {"variant": "fp32", "package": package, "registries": registries, **params}
        try:
            backend = entry.factory(path, **kwargs)
        except NotAvailableError as exc:
            raise CheckSkipped(f"not available for a model without a training run: {exc.message}") from None
        for method in ("predict", "info"):
            if not callable(getattr(backend, method, None)):
                raise CheckFailed(f"the factory returned {type(backend).__name__}, which has no {method}()")
        info = backend.info()
        if not isinstance(info, dict):
            raise CheckFailed(f"info() returned {type(info).__name__}, not a dict")
        try:
            json.dumps(info)
        except (TypeError, ValueError) as exc:
            raise CheckFailed(f"info() is not JSON-able: {one_line(exc)}") from None
        state["backend"] = backend
        shown = {k: info[k] for k in ("backend", "variant", "provider") if k in info}
        return f"info() {shown}"

    def predict() -> str:
        import numpy as np
        import torch

        backend = needed(state, "backend", "loads a tiny model")
        model, example = tiny_classifier()
        worst = 0.0
        for batch in (example[:3], example[:1]):
            with torch.no_grad():
                reference = model(batch).numpy()
            got = backend.predict(np.ascontiguousarray(batch.numpy(), dtype=np.float32))
            got = np.asarray(got)
            if got.shape != reference.shape:
                raise CheckFailed(
                    f"predict() of {shape(batch)} gave {shape(got)}; expected {reference.shape}"
                )
            if got.dtype != np.float32:
                raise CheckFailed(f"predict() gave {got.dtype} logits; the contract is float32")
            diff = float(np.abs(got - reference).max())
            if diff > tolerance:
                raise CheckFailed(
                    f"predict() differs from torch: max abs diff {diff:.2e} (tolerance {tolerance:g})"
                )
            worst = max(worst, diff)
        return f"float32 logits at batch 3 and 1, max abs diff {worst:.1e} (tolerance {tolerance:g})"

    def infer() -> str:
        import numpy as np
        import torch

        backend = needed(state, "backend", "loads a tiny model")
        if not callable(getattr(backend, "infer", None)):
            raise CheckSkipped(
                "no infer(batch, cam): optional; the unknown flag then uses the top probability"
            )
        model, example = tiny_classifier()
        with torch.no_grad():
            logits, features = (t.numpy() for t in _with_features(model)(example[:3]))
        got = backend.infer(np.ascontiguousarray(example[:3].numpy(), dtype=np.float32), cam=False)
        if not isinstance(got, dict) or "logits" not in got:
            raise CheckFailed(f"infer() returned {type(got).__name__}; expected a dict with 'logits'")
        for name, reference in (("logits", logits), ("features", features)):
            value = np.asarray(got.get(name))
            if name not in got or value.shape != reference.shape:
                raise CheckFailed(f"infer()[{name!r}] is {shape(value)}; expected {reference.shape}")
            diff = float(np.abs(value - reference).max())
            if diff > tolerance:
                raise CheckFailed(f"infer()[{name!r}] differs from torch: max abs diff {diff:.2e}")
        return f"logits and features {features.shape[1:]} match torch"

    return [
        Check("loads a tiny model", loads, ONNX),
        Check("predict", predict, ONNX),
        Check("infer", infer, ONNX),
    ]
