"""The same checks for every registered serving backend, third-party ones included, on a tiny model
published to a registry: top-1 equal to the training model's, batch-size independence, info(), and
class-activation maps where a backend offers them. Then the torch backend's refusals."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from thali.core import build_plugin_manager
from thali.core.errors import IntegrityError, NotAvailableError
from thali.core.inference import Preprocessor, load_backend
from thali.registry import ModelRegistry

REGISTRIES = build_plugin_manager().registries
BACKENDS = REGISTRIES.serving_backends.names()


@pytest.fixture(scope="module")
def packages(tiny_run: Path, tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny export as v1, and an ``export.explain`` export of the same run (with a ``cam`` output)
    as v2, both resolved (verified) from a local registry."""
    from thali.core.exporting.pipeline import export_run

    root = tmp_path_factory.mktemp("serving")
    explain = root / "explain"
    overrides = ["export.explain=true", "export.variants=[fp32]"]
    export_run(tiny_run, REGISTRIES, out_dir=explain, overrides=overrides, progress=False)
    registry = ModelRegistry(root / "registry", cache_dir=root / "cache")
    registry.publish(tiny_export)
    registry.publish(explain)
    RUNS["tiny"] = tiny_run  # the torch backend is a development backend: it is given the run folder
    return {"plain": registry.resolve("tiny", 1), "explain": registry.resolve("tiny", 2)}


RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def batch(tiny_data: Path, packages: dict[str, Any]) -> np.ndarray:
    """7 preprocessed images of the three classes."""
    preprocess = Preprocessor(packages["plain"].preprocess)
    paths = [p for name in ("blue", "green", "red") for p in sorted((tiny_data / name).glob("0*.jpg"))[:3]]
    return np.stack([preprocess(p.read_bytes()) for p in paths[:7]])


@pytest.fixture(scope="module")
def reference(tiny_run: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The training model's logits and class-activation maps on ``batch``."""
    import torch

    from thali.core.training.evaluate import load_run
    from thali.core.training.onnx import WithCam

    model = load_run(tiny_run, REGISTRIES).model
    with torch.no_grad():
        logits, cam = WithCam(model).eval()(torch.from_numpy(batch))
    return {"logits": logits.numpy(), "cam": cam.numpy()}


def _backend(name: str, package: Any) -> Any:
    try:
        return load_backend(
            REGISTRIES,
            name,
            package.model_path("fp32"),
            variant="fp32",
            package=package,
            registries=REGISTRIES,
            run_dir=RUNS.get(package.domain),
        )
    except NotAvailableError as exc:
        pytest.skip(f"serving backend {name!r} is not available here: {exc.message}")


@pytest.mark.parametrize("name", BACKENDS)
def test_predict_agrees_with_the_training_model_at_any_batch_size(
    name: str, packages: dict[str, Any], batch: np.ndarray, reference: dict[str, np.ndarray]
) -> None:
    backend = _backend(name, packages["plain"])
    logits = np.asarray(backend.predict(batch))
    assert logits.shape == (7, 3) and np.isfinite(logits).all()
    np.testing.assert_array_equal(logits.argmax(1), reference["logits"].argmax(1))
    singles = np.concatenate([np.asarray(backend.predict(batch[i : i + 1])) for i in range(len(batch))])
    np.testing.assert_allclose(singles, logits, atol=1e-4, rtol=0)
    info = backend.info()
    assert info["backend"] == name and isinstance(info["provider"], str) and info["provider"]
    assert info["variant"] == "fp32" and isinstance(info["explain"], bool)


@pytest.mark.data
@pytest.mark.parametrize("name", BACKENDS)
def test_predict_agrees_with_the_training_model_on_real_photos(
    name: str, packages: dict[str, Any], datasets_root: Path, tiny_run: Path
) -> None:
    """Real photos of other sizes and aspect ratios through the served path: the backend's top-1 equals
    the training model's on the same preprocessed input, at batch 7 and one by one."""
    import torch

    from thali.core.training.evaluate import load_run

    folders = sorted(p for p in (datasets_root / "south_asian_food").iterdir() if p.is_dir())[:7]
    photos = [sorted(f.glob("*.jp*g"))[0] for f in folders]
    preprocess = Preprocessor(packages["plain"].preprocess)
    batch = np.stack([preprocess(p.read_bytes()) for p in photos])
    with torch.no_grad():
        expected = load_run(tiny_run, REGISTRIES).model(torch.from_numpy(batch)).numpy()
    backend = _backend(name, packages["plain"])
    logits = np.asarray(backend.predict(batch))
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
    singles = np.concatenate([np.asarray(backend.predict(batch[i : i + 1])) for i in range(7)])
    np.testing.assert_array_equal(singles.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("name", BACKENDS)
def test_explain_gives_logits_and_class_activation_maps(
    name: str, packages: dict[str, Any], batch: np.ndarray, reference: dict[str, np.ndarray]
) -> None:
    backend = _backend(name, packages["explain"])
    if not backend.info()["explain"] or not callable(getattr(backend, "explain", None)):
        pytest.skip(f"serving backend {name!r} offers no class-activation maps")
    logits, cam = backend.explain(batch)
    logits, cam = np.asarray(logits), np.asarray(cam)
    np.testing.assert_allclose(logits, np.asarray(backend.predict(batch)), atol=1e-4, rtol=0)
    assert cam.ndim == 4 and cam.shape == reference["cam"].shape and cam.shape[:2] == (7, 3)
    scale = max(1.0, float(np.abs(reference["cam"]).max()))
    assert np.abs(cam - reference["cam"]).max() <= 1e-3 * scale


def test_onnxruntime_explain_without_a_cam_output_is_refused(packages: dict[str, Any]) -> None:
    backend = _backend("onnxruntime", packages["plain"])
    assert backend.info()["explain"] is False
    with pytest.raises(NotAvailableError, match="without a heatmap output"):
        backend.explain(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_torch_backend_serves_only_the_checkpoint_the_package_was_made_from(
    packages: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = packages["plain"]
    lineage = package.manifest.lineage
    run = RUNS["tiny"]

    def fake(sha: str = str(lineage.checkpoint_sha256)) -> Any:
        manifest = package.manifest.model_copy(
            update={"lineage": lineage.model_copy(update={"checkpoint_sha256": sha})}
        )
        return SimpleNamespace(
            domain="tiny", version=1, manifest=manifest, files=package.files, calibration={}
        )

    path = package.model_path("fp32")
    with pytest.raises(NotAvailableError, match=r"not at hand.*pass run_dir.*onnxruntime backend"):
        load_backend(
            REGISTRIES, "torch", path, package=fake(), registries=REGISTRIES, run_dir=tmp_path / "gone"
        )
    monkeypatch.setenv("THALI_RUNS", str(tmp_path / "runs"))  # the default place: RUNS/DOMAIN/RUN_ID
    with pytest.raises(NotAvailableError, match=r"runs/tiny/run/best.pt is not at hand"):
        load_backend(REGISTRIES, "torch", path, package=fake(), registries=REGISTRIES)
    moved = tmp_path / "runs" / "tiny" / str(lineage.run_id)
    moved.mkdir(parents=True)
    for name in ("best.pt", "config.yaml", "calibration.json"):
        shutil.copy(run / name, moved / name)
    with pytest.raises(IntegrityError, match=r"sha256 differs.*onnxruntime backend"):
        load_backend(REGISTRIES, "torch", path, package=fake("0" * 64), registries=REGISTRIES)
    with pytest.raises(NotAvailableError, match="fp32 checkpoint"):
        load_backend(REGISTRIES, "torch", path, package=package, registries=REGISTRIES, variant="int8")
    backend = load_backend(REGISTRIES, "torch", path, package=fake(), registries=REGISTRIES)
    assert backend.info()["checkpoint"] == str(moved / "best.pt")
    assert backend.info()["provider"] in ("cpu", "cuda:0")


@pytest.mark.parametrize("name", BACKENDS)
def test_infer_gives_the_features_the_package_unknown_score_reads(
    name: str, packages: dict[str, Any], batch: np.ndarray
) -> None:
    """``infer`` returns ``features`` and, for a score with layers (the tiny export reads stages 0 and
    1), ``stage_features``: the same values the exported graph gives, so the shipped score applies."""
    import onnxruntime as ort

    from thali.core.inference.unknown import load_spec

    package = packages["plain"]
    score = load_spec(package.calibration)
    assert score is not None and [layer.stage for layer in score.layers] == [0, 1]
    backend = _backend(name, package)
    if not callable(getattr(backend, "infer", None)):
        pytest.skip(f"serving backend {name!r} has no infer()")
    out = backend.infer(batch, cam=False)
    session = ort.InferenceSession(str(package.model_path("fp32")), providers=["CPUExecutionProvider"])
    features, stages = session.run(["features", "stage_features"], {"input": batch})
    assert set(out) == {"logits", "features", "stage_features"}
    np.testing.assert_allclose(out["features"], features, atol=1e-3, rtol=0)
    np.testing.assert_allclose(out["stage_features"], stages, atol=1e-3, rtol=0)
    np.testing.assert_allclose(
        score.scores(out["features"], out["stage_features"]), score.scores(features, stages), atol=1e-3
    )


def test_torch_backend_refuses_a_spec_naming_a_stage_its_checkpoint_lacks(packages: dict[str, Any]) -> None:
    import copy

    from thali.core.errors import DataError

    package = packages["plain"]
    calibration = copy.deepcopy(package.calibration)
    calibration["unknown"]["layers"][1]["stage"] = 9
    odd = SimpleNamespace(
        domain="tiny", version=1, manifest=package.manifest, files=package.files, calibration=calibration
    )
    with pytest.raises(DataError, match=r"stages \[0, 9\]; the checkpoint's backbone has 3"):
        load_backend(
            REGISTRIES,
            "torch",
            package.model_path("fp32"),
            package=odd,
            registries=REGISTRIES,
            run_dir=RUNS["tiny"],
        )
