"""Checks of exporters and serving backends, on a tiny classifier made here (no training needed).

Exporter (``thali_register_exporters``): ``factory(**params)`` returns an object with ``run(context)``
and an optional ``produces`` (a variant name, or ``None`` for the steps that make the fp32 model). The
round trip runs it as ``thali export`` does: after the fp32 steps (``onnx``, ``ort_optimize``, made once
and copied into each check's own folder), on a :class:`~thali.core.export.ExportContext` with the tiny
classifier, an example batch and a calibration batch. It must return a JSON-able report and record
files in ``context.artifacts`` (``artifacts[produces]`` for a variant) that ONNX Runtime runs to
logits of the right shape; fp32 files must match torch within the tolerance.

Serving backend (``thali_register_serving_backends``): ``factory(model_path, variant="fp32",
package=..., registries=...)`` on the tiny classifier exported with thali's helper (outputs ``logits``
and ``features``). It returns a :class:`~thali.core.inference.ServingBackend` (``capabilities`` and
``run(batch, outputs)``) or a predict-only backend (``predict``, optionally ``infer``), which is checked
wrapped as the server wraps it. ``info()`` is a JSON-able dict; ``capabilities`` names only known
outputs the model has; ``run(batch, {})`` gives float32 logits equal to torch's at two batch sizes; a
backend declaring ``features`` gives them equal to torch's too (the output the unknown flag reads). The
``package`` is a :class:`~thali.core.manifest.ModelPackage` without training lineage: a backend that
needs more (the torch backend needs the training run) says so with a ``NotAvailableError`` and the check
is skipped with its message.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from thali.core.errors import NotAvailableError, one_line
from thali.core.export import CAM, FEATURES, LOGITS, STAGE_FEATURES, variant_file
from thali.core.manifest import ClassLabel, Manifest, ModelPackage, VariantCard
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
    kit = _ExporterKit(entry, registries, options)
    return [Check("builds", kit.builds), Check("round trip", kit.round_trip, ONNX)]


class _ExporterKit:
    """The checks of one exporter entry, one method (or helper) per rule."""

    def __init__(self, entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> None:
        self.entry = entry
        self.registries = registries
        self.params = params_of(options)
        self.tolerance = float(options.get("tolerance", 1e-3))

    def build(self) -> Any:
        exporter = self.entry.factory(**self.params)
        if not callable(getattr(exporter, "run", None)):
            raise CheckFailed(f"the factory returned {type(exporter).__name__}, which has no run(context)")
        produces = getattr(exporter, "produces", None)
        if produces is not None and not is_valid_name(produces):
            raise CheckFailed(f"produces {produces!r} is not a valid variant name (it becomes a file name)")
        return exporter

    def builds(self) -> str:
        exporter = self.build()
        produces = getattr(exporter, "produces", None)
        what = f"produces variant {produces!r}" if produces else "an fp32 step (produces None)"
        return f"{type(exporter).__name__}: {what}"

    def round_trip(self) -> str:
        with tempfile.TemporaryDirectory(prefix="thali-check-") as tmp:
            out = Path(tmp)
            context = _context(out)
            self._copy_fp32_steps(context, out)
            exporter = self.build()
            new = _run_exporter(exporter, context)
            produces = getattr(exporter, "produces", None)
            reference = context.torch_logits()
            parts = [
                self._artifact_parity(artifact, path, out, context, reference, produces)
                for artifact, path in new.items()
            ]
        return "; ".join(parts)

    def _copy_fp32_steps(self, context: Any, out: Path) -> None:
        """The files of the fp32 steps that run before this exporter, copied into ``out`` and recorded in
        ``context.artifacts``, as ``thali export`` has them by then."""
        name = self.entry.name
        before_steps = FP32_STEPS[: FP32_STEPS.index(name)] if name in FP32_STEPS else FP32_STEPS
        if not before_steps:
            return
        steps = _prepared_steps(self.registries)
        if "error" in steps:
            raise CheckSkipped(steps["error"])
        for step in before_steps:
            for artifact, path in steps[step].items():
                context.artifacts[artifact] = Path(shutil.copy2(path, out / Path(path).name))

    def _artifact_parity(
        self, artifact: str, path: Path, out: Path, context: Any, reference: Any, produces: str | None
    ) -> str:
        """One recorded file: inside ``out`` (the context's ``out_dir``), it runs in ONNX Runtime to finite
        logits of torch's shape; an fp32 file (``produces`` None) is also within the tolerance of torch's."""
        import numpy as np

        _check_artifact_location(artifact, path, out)
        got = _artifact_logits(artifact, path, context.example)
        if got.shape != reference.shape:
            raise CheckFailed(f"artifacts[{artifact!r}] gives {shape(got)} logits, torch {shape(reference)}")
        if not np.isfinite(got).all():
            raise CheckFailed(f"artifacts[{artifact!r}] gives NaN or infinite logits")
        diff = float(np.abs(got - reference).max())
        agree = float(np.mean(got.argmax(1) == reference.argmax(1)))
        if not produces and diff > self.tolerance:
            raise CheckFailed(
                f"fp32 artifact {artifact!r} differs from torch: max abs logit diff {diff:.2e} "
                f"(tolerance {self.tolerance:g})"
            )
        return f"{artifact} ({path.name}): max abs logit diff {diff:.1e}, top-1 agreement {agree:.2f}"


def _run_exporter(exporter: Any, context: Any) -> dict[str, Path]:
    """Run ``exporter`` on ``context``: its report must be a JSON-able dict, and it must record a file (the
    variant it ``produces``, if any). The artifacts it recorded, by name."""
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
    return new


def _check_artifact_location(artifact: str, path: Path, out_dir: Path) -> None:
    """A recorded artifact is a file inside the context's ``out_dir``."""
    if not path.is_file():
        raise CheckFailed(f"artifacts[{artifact!r}] = {path}: no such file")
    try:
        path.resolve().relative_to(out_dir.resolve())
    except ValueError:
        raise CheckFailed(f"artifacts[{artifact!r}] = {path} is outside context.out_dir") from None


def _artifact_logits(artifact: str, path: Path, example: Any) -> Any:
    """The logits ONNX Runtime gives for ``example`` from the file of ``artifact``."""
    try:
        session = _session(path)
        return session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    except Exception as exc:
        raise CheckFailed(f"ONNX Runtime cannot run artifacts[{artifact!r}]: {one_line(exc)}") from None


def _tiny_manifest() -> Manifest:
    """The tiny classifier's ``card.json``: its classes and its one fp32 variant, no lineage."""
    return Manifest(
        domain="conformance-check",
        version=1,
        classes=[ClassLabel(name=f"class_{i}") for i in range(NUM_CLASSES)],
        variants={"fp32": VariantCard(file=variant_file("fp32"))},
    )


def tiny_package(path: Path) -> ModelPackage:
    """A :class:`~thali.core.manifest.ModelPackage` of the tiny classifier's one fp32 file, with a
    manifest without lineage (no training run stands behind the tiny model)."""
    return ModelPackage(
        domain="conformance-check",
        version=1,
        folder=path.parent,
        files={variant_file("fp32"): path},
        labels={"classes": [{"name": f"class_{i}"} for i in range(NUM_CLASSES)]},
        preprocess={
            "input_size": [3, SIDE, SIDE],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        },
        calibration={"temperature": 1.0, "unknown_threshold": 0.0},
        manifest=_tiny_manifest(),
    )


@lru_cache(maxsize=1)
def tiny_onnx() -> Path:
    """The tiny classifier exported as ``thali export`` does (input ``input``, outputs ``logits`` and
    ``features``), once."""
    from thali.core.training.onnx import export_onnx

    model, example = tiny_classifier()
    folder = _cache_dir() / "serving"
    folder.mkdir(exist_ok=True)
    module = _with_features(copy.deepcopy(model))
    return export_onnx(module, example, folder / "model.onnx", output_names=[LOGITS, FEATURES])


def serving_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    kit = _ServingKit(entry, registries, options)
    return [
        Check("loads a tiny model", kit.loads, ONNX),
        Check("capabilities", kit.capabilities, ONNX),
        Check("predict", kit.predict, ONNX),
        Check("infer", kit.infer, ONNX),
    ]


class _ServingKit:
    """The checks of one serving backend entry, one method per rule, in the order they run; ``state``
    holds what ``loads`` made for the later checks: the backend as the server runs it (a predict-only
    backend wrapped in :class:`~thali.core.inference.PredictOnlyAdapter`)."""

    def __init__(self, entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> None:
        self.entry = entry
        self.registries = registries
        self.params = params_of(options)
        self.tolerance = float(options.get("tolerance", 1e-4))
        self.state: dict[str, Any] = {}

    def loads(self) -> str:
        from thali.core.inference import PredictOnlyAdapter

        backend = self._load()
        native = (
            callable(getattr(backend, "run", None)) and getattr(backend, "capabilities", None) is not None
        )
        if not native and not callable(getattr(backend, "predict", None)):
            raise CheckFailed(
                f"the factory returned {type(backend).__name__}, which has neither run(batch, outputs) "
                "with capabilities nor predict(batch)"
            )
        if not callable(getattr(backend, "info", None)):
            raise CheckFailed(f"the factory returned {type(backend).__name__}, which has no info()")
        info = _info_of(backend)
        self.state["backend"] = backend if native else PredictOnlyAdapter(backend, info)
        shown = {k: info[k] for k in ("backend", "variant", "provider") if k in info}
        return f"info() {shown}" + ("" if native else " (predict-only: the server wraps it)")

    def _load(self) -> Any:
        """The backend, made as thali's hosting makes it, on the tiny classifier's ONNX file."""
        path = tiny_onnx()
        kwargs = {
            "variant": "fp32",
            "package": tiny_package(path),
            "registries": self.registries,
            **self.params,
        }
        try:
            return self.entry.factory(path, **kwargs)
        except NotAvailableError as exc:
            raise CheckSkipped(f"not available for a model without a training run: {exc.message}") from None

    def capabilities(self) -> str:
        """``capabilities`` names only outputs thali knows; the tiny model has ``features`` and no
        ``stage_features`` or ``cam``, so a backend that reads its model's outputs declares features."""
        from thali.core.inference import CAPABILITIES

        backend = needed(self.state, "backend", "loads a tiny model")
        declared = backend.capabilities
        if not isinstance(declared, frozenset | set) or not all(isinstance(c, str) for c in declared):
            raise CheckFailed(f"capabilities is {type(declared).__name__}; expected a frozenset of names")
        unknown = sorted(set(declared) - CAPABILITIES)
        if unknown:
            raise CheckFailed(f"capabilities names {unknown}; known: {sorted(CAPABILITIES)}")
        absent = sorted(set(declared) & {STAGE_FEATURES, CAM})
        if absent:
            raise CheckFailed(f"capabilities declares {absent}, which the tiny model does not have")
        return f"declares {sorted(declared) or 'logits only'}"

    def predict(self) -> str:
        backend = needed(self.state, "backend", "loads a tiny model")
        model, example = tiny_classifier()
        worst = 0.0
        for batch in (example[:3], example[:1]):
            worst = max(worst, self._predict_diff(backend, model, batch))
        return f"float32 logits at batch 3 and 1, max abs diff {worst:.1e} (tolerance {self.tolerance:g})"

    def _predict_diff(self, backend: Any, model: Any, batch: Any) -> float:
        """``run(batch, {})['logits']``: float32 logits of torch's shape, within the tolerance."""
        import numpy as np
        import torch

        with torch.no_grad():
            reference = model(batch).numpy()
        out = backend.run(np.ascontiguousarray(batch.numpy(), dtype=np.float32), frozenset())
        if not isinstance(out, dict) or LOGITS not in out:
            raise CheckFailed(f"run() returned {type(out).__name__}; expected a dict with 'logits'")
        got = np.asarray(out[LOGITS])
        if got.shape != reference.shape:
            raise CheckFailed(f"logits of {shape(batch)} are {shape(got)}; expected {reference.shape}")
        if got.dtype != np.float32:
            raise CheckFailed(f"the logits are {got.dtype}; the contract is float32")
        diff = float(np.abs(got - reference).max())
        if diff > self.tolerance:
            raise CheckFailed(
                f"the logits differ from torch: max abs diff {diff:.2e} (tolerance {self.tolerance:g})"
            )
        return diff

    def infer(self) -> str:
        import numpy as np
        import torch

        backend = needed(self.state, "backend", "loads a tiny model")
        if FEATURES not in backend.capabilities:
            raise CheckSkipped(
                "declares no features: optional; the unknown flag then uses the top probability"
            )
        model, example = tiny_classifier()
        with torch.no_grad():
            logits, features = (t.numpy() for t in _with_features(model)(example[:3]))
        got = backend.run(np.ascontiguousarray(example[:3].numpy(), dtype=np.float32), frozenset({FEATURES}))
        if not isinstance(got, dict) or LOGITS not in got:
            raise CheckFailed(f"run() returned {type(got).__name__}; expected a dict with 'logits'")
        for name, reference in ((LOGITS, logits), (FEATURES, features)):
            _check_output(got, name, reference, self.tolerance)
        return f"logits and features {features.shape[1:]} match torch"


def _info_of(backend: Any) -> dict[str, Any]:
    """``backend.info()``, which must be a JSON-able dict."""
    info = backend.info()
    if not isinstance(info, dict):
        raise CheckFailed(f"info() returned {type(info).__name__}, not a dict")
    try:
        json.dumps(info)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"info() is not JSON-able: {one_line(exc)}") from None
    return info


def _check_output(got: dict[str, Any], name: str, reference: Any, tolerance: float) -> None:
    """``infer()[name]`` has torch's shape and values, within the tolerance."""
    import numpy as np

    value = np.asarray(got.get(name))
    if name not in got or value.shape != reference.shape:
        raise CheckFailed(f"run()[{name!r}] is {shape(value)}; expected {reference.shape}")
    diff = float(np.abs(value - reference).max())
    if diff > tolerance:
        raise CheckFailed(f"run()[{name!r}] differs from torch: max abs diff {diff:.2e}")
