"""The serving preprocessing (OpenCV + numpy, no torch), which training's evaluation transform now is,
against the albumentations transform training evaluated with before, on real photos of many sizes, and
a server's import graph without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from thali.core.inference import Preprocessor

# EfficientNet-Lite0's preprocessing, as its backbone declares it.
LITE0 = {
    "input_size": [3, 224, 224],
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


@pytest.fixture(scope="module")
def photos(datasets_root: Path) -> list[Path]:
    """12 photos from several south_asian_food classes, each of a size not picked before (square,
    landscape, portrait, very wide, smaller than the crop)."""
    from PIL import Image

    root = datasets_root / "south_asian_food"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    picked: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        per_class = 0
        for path in sorted(folder.iterdir())[:80]:
            try:
                with Image.open(path) as img:
                    size = img.size
            except Exception:
                continue
            if size not in seen and per_class < 2:
                seen.add(size)
                picked.append(path)
                per_class += 1
        if len(picked) >= 12:
            break
    picked = picked[:12]
    assert len({p.parent for p in picked}) >= 4 and len(picked) == 12
    return picked


def _both(path: Path, preprocess: dict[str, Any], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(serving's tensor from the file's bytes, the albumentations evaluation transform's)."""
    from preprocess_support import reference_eval

    from thali.core.training.data import load_rgb

    ours = Preprocessor(spec)(path.read_bytes())
    theirs = reference_eval(preprocess)(image=load_rgb(path))["image"].transpose(2, 0, 1)
    return ours, theirs


def test_serving_preprocess_equals_the_evaluation_transform(photos: list[Path]) -> None:
    from thali.core.exporting.pipeline import preprocess_spec

    spec = preprocess_spec(LITE0)
    sizes = set()
    for path in photos:
        ours, theirs = _both(path, LITE0, spec)
        assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == np.float32, path
        assert np.array_equal(ours, theirs), path
        from PIL import Image

        with Image.open(path) as img:
            sizes.add(img.size)
    assert any(w > h for w, h in sizes) and any(min(s) < 224 for s in sizes)  # wide ones, upscaled ones


def test_a_tiny_model_sees_the_same_tensors_served_and_evaluated(
    photos: list[Path], tiny_export: Path
) -> None:
    """The tiny model's 37 px resize shrinks these photos 8-10x: the reduced-scale JPEG decode and the
    averaging resize apply, and training's evaluation dataset gives the very tensors serving does."""
    import onnxruntime as ort

    from thali.core.training.data import ImageDataset
    from thali.core.training.transforms import eval_transform

    spec = json.loads((tiny_export / "preprocess.json").read_text())
    dataset = ImageDataset([(path, 0) for path in photos], eval_transform(spec))
    evaluated = [dataset[i][0].numpy() for i in range(len(photos))]  # type: ignore[index]
    served = [Preprocessor(spec)(path.read_bytes()) for path in photos]
    assert all(np.array_equal(a, b) for a, b in zip(evaluated, served, strict=True))
    session = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: np.stack(served)})[0]
    assert logits.shape == (len(photos), 3) and np.isfinite(logits).all()


SERVER = """
    import sys
    from pathlib import Path

    import numpy as np

    import thali.core.inference
    from thali.core import build_plugin_manager
    from thali.core.inference import Preprocessor, load_backend

    export = Path(sys.argv[1])
    spec = __import__("json").loads((export / "preprocess.json").read_text())
    registries = build_plugin_manager(autoload=False).registries
    backend = load_backend(registries, "onnxruntime", export / "model.onnx", variant="fp32")
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    logits = backend.predict(Preprocessor(spec)(image)[None])
    assert logits.shape == (1, 3), logits.shape
    heavy = sorted(m for m in ("torch", "albumentations", "timm") if m in sys.modules)
    print("heavy:", ",".join(heavy))
"""


def test_serving_never_imports_torch(tiny_export: Path) -> None:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SERVER), str(tiny_export)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy:", result.stdout


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "area", "lanczos"])
def test_every_interpolation_trains_and_serves_alike(photos: list[Path], interpolation: str) -> None:
    """One table for both sides: a backbone declaring ``lanczos`` once trained bilinear and served
    Lanczos (the training table lacked it and fell back silently)."""
    from thali.core.exporting.pipeline import preprocess_spec

    declared = {**LITE0, "interpolation": interpolation}
    spec = preprocess_spec(declared)
    assert spec["interpolation"] == interpolation
    for path in photos[:6]:
        ours, theirs = _both(path, declared, spec)
        assert np.array_equal(ours, theirs), (interpolation, path)
    if interpolation != "bilinear":  # and it is not bilinear in disguise on either side
        plain, _ = _both(photos[0], LITE0, preprocess_spec(LITE0))
        ours, theirs = _both(photos[0], declared, spec)
        assert np.abs(ours - plain).max() > 0.05 and np.abs(theirs - plain).max() > 0.05


def test_an_unknown_interpolation_is_refused_on_both_sides() -> None:
    from thali.core.errors import DataError, PluginError
    from thali.core.training.backbone import as_feature_backbone
    from thali.core.training.transforms import eval_transform

    declared = {**LITE0, "interpolation": "hamming"}
    with pytest.raises(DataError, match=r"^preprocess\.json: interpolation 'hamming' is not one of nearest"):
        Preprocessor(declared)
    with pytest.raises(DataError, match="interpolation 'hamming'"):
        eval_transform(declared)
    import torch

    module = torch.nn.Conv2d(3, 8, 3)
    module.num_features = 8  # type: ignore[assignment]
    with pytest.raises(PluginError, match=r"^backbone 'mine' \(plugin x\): interpolation 'hamming' is not"):
        as_feature_backbone(module, "mine", "plugin x", declared)
