"""Phone photos (issue 27): a 12 MP JPEG is decoded at reduced DCT scale and downscaled with averaging,
HEIC is read, and every web-size photo keeps exactly the tensors it had. Real photos from the shared
datasets and the bundled south_asian_food model; the API side (HEIC bombs, truncated HEIC) is in
tests/api/test_attacks.py. Figures (speed, top-1 on upscaled photos) come from
benchmarks/phone_photos.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from preprocess_support import reference_eval

from thali.core.images import accepted_formats, decode_rgb, interpolation_flag, jpeg_draft_scale
from thali.core.inference import Preprocessor
from thali.core.inference.preprocess import resize_shorter

REPO = Path(__file__).resolve().parents[3]
BUNDLED = REPO / "models" / "south_asian_food" / "versions" / "5"


def bundled_preprocess() -> dict[str, Any]:
    return json.loads((BUNDLED / "preprocess.json").read_text())


def test_every_validation_photo_of_three_classes_keeps_its_tensor(
    datasets_root: Path, registries: Any
) -> None:
    """Serving's preprocessor (from the file's bytes) and training's evaluation dataset give exactly
    the tensor the albumentations transform gave, on every validation photo of three classes."""
    from thali.core.domains import resolve_domain
    from thali.core.training.data import ImageDataset, load_rgb, make_split
    from thali.core.training.transforms import eval_transform

    root = datasets_root / "south_asian_food"
    config = resolve_domain(registries, "south_asian_food").load_config()
    samples = registries.datasets.create("imagefolder", root, classes=config.class_names).samples
    split, _ = make_split(config, root, samples)
    labels = sorted({label for _, label in split.val})[:3]
    photos = [(path, label) for path, label in split.val if label in labels]
    assert len(photos) >= 30 and len({label for _, label in photos}) == 3
    preprocess = bundled_preprocess()
    reference, serving = reference_eval(preprocess), Preprocessor(preprocess)
    evaluation = ImageDataset(photos, eval_transform(preprocess))
    for i, (path, _) in enumerate(photos):
        expected = reference(image=load_rgb(path))["image"].transpose(2, 0, 1)
        served = serving(Path(path).read_bytes())
        item = evaluation[i]
        assert item is not None, path
        assert np.array_equal(served, expected), path
        assert np.array_equal(item[0].numpy(), expected), path


def _web_photos(datasets_root: Path, count: int) -> list[Path]:
    """One photo from each of ``count`` classes, landscape and at least 300 px high (web size)."""
    picked = []
    for folder in sorted(p for p in (datasets_root / "south_asian_food").iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            with Image.open(path) as img:
                w, h = img.size
            if w > h >= 300:
                picked.append(path)
                break
        if len(picked) == count:
            return picked
    pytest.skip("not enough landscape web photos")


def phone_size(path: Path, width: int, seed: int = 0) -> Image.Image:
    """A web photo upscaled to a phone's frame (bicubic) with sensor-like noise (sd 4 levels)."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    h = round(width * rgb.shape[0] / rgb.shape[1])
    big = cv2.resize(rgb, (width, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    big += np.random.default_rng(seed).normal(0, 4, big.shape).astype(np.float32)
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bundled_model() -> Any:
    import onnxruntime as ort

    if not (BUNDLED / "model.onnx").is_file():
        pytest.skip(f"{BUNDLED} is absent")
    session = ort.InferenceSession(str(BUNDLED / "model.onnx"), providers=["CPUExecutionProvider"])
    preprocessor = Preprocessor(bundled_preprocess())

    def probabilities(images: list[bytes]) -> np.ndarray:
        batch = np.stack([preprocessor(data) for data in images])
        logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        return shifted / shifted.sum(1, keepdims=True)

    return probabilities


def test_a_12mp_jpeg_and_a_heic_photo_classify_like_their_web_versions(
    datasets_root: Path, bundled_model: Any
) -> None:
    assert "HEIF" in accepted_formats()
    photos = _web_photos(datasets_root, 6)
    web = bundled_model([p.read_bytes() for p in photos])
    phone = [phone_size(p, 4032, seed=i) for i, p in enumerate(photos)]
    jpegs = [encoded(img, "JPEG", quality=92) for img in phone]
    assert all(len(data) > 1_000_000 for data in jpegs)
    assert Image.open(io.BytesIO(jpegs[0])).size[0] == 4032
    big = bundled_model(jpegs)
    assert (big.argmax(1) == web.argmax(1)).all(), (big.argmax(1), web.argmax(1))
    assert np.abs(big - web).max() < 0.2
    # HEIC (what iPhones save), at 2016 px wide: x265 takes ~8 s for a 12 MP frame on 2 cores
    heics = [encoded(phone_size(p, 2016, seed=9), "HEIF", quality=90) for p in photos[:2]]
    assert all(Image.open(io.BytesIO(data)).format == "HEIF" for data in heics)
    heic = bundled_model(heics)
    assert (heic.argmax(1) == web[:2].argmax(1)).all()
    assert np.abs(heic - web[:2]).max() < 0.2


def test_a_phone_jpeg_decodes_at_reduced_scale_with_exif_rotation() -> None:
    """4032 x 3024 with EXIF orientation 6 (a phone held upright): decoded at 1/4 scale for a 256 px
    target, turned upright, and the left half of the sensor (red) is the top of the photo."""
    pixels = np.zeros((3024, 4032, 3), np.uint8)
    pixels[:, :2016] = (200, 30, 30)
    pixels[:, 2016:] = (30, 30, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(Image.fromarray(pixels), "JPEG", quality=90, exif=exif.tobytes())
    assert jpeg_draft_scale(4032, 3024, 512) == 4 and jpeg_draft_scale(400, 300, 512) == 1
    small = decode_rgb(data, keep_shorter=512)
    full = decode_rgb(data)
    assert full.shape == (4032, 3024, 3) and small.shape == (1008, 756, 3)
    assert small[:400].mean(axis=(0, 1))[0] > 150 and small[-400:].mean(axis=(0, 1))[2] > 150
    preprocessor = Preprocessor(bundled_preprocess())
    crop = preprocessor.crop(data)
    assert crop[:60].mean(axis=(0, 1))[0] > 150 and crop[-60:].mean(axis=(0, 1))[2] > 150


def test_a_large_shrink_averages_instead_of_sampling() -> None:
    """One-pixel stripes shrunk 12x: averaging gives flat grey, as the photo looks from afar; the
    model's own bicubic sampled them into stripes the model never saw in training (aliasing)."""
    stripes = np.zeros((3072, 4096, 3), np.uint8)
    stripes[:, ::2] = 255
    interpolation = interpolation_flag("bicubic")
    ours = resize_shorter(stripes, 256, interpolation)
    sampled = cv2.resize(stripes, (341, 256), interpolation=interpolation)
    assert ours.shape == sampled.shape == (256, 341, 3)
    assert abs(float(ours.mean()) - 127.5) < 2 and ours.std() < 2
    assert sampled.std() > 20
    small = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)  # a 1.2x shrink
    assert np.array_equal(
        resize_shorter(small, 256, interpolation), cv2.resize(small, (341, 256), interpolation=interpolation)
    )
