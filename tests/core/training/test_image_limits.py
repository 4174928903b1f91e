"""Image limits wherever images are decoded: a real PNG bomb, oversize and empty files, truncated JPEGs."""

from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_PREPROCESS, write_tiny_domain

from thali.core import ConfigError, load_config
from thali.core.errors import DataError
from thali.core.exporting.data import calibration_batches, load_validation
from thali.core.images import ImageLimits, decode_rgb
from thali.core.samples import verify_images
from thali.core.training.data import ImageDataset, Split, load_rgb, read_samples
from thali.core.training.transforms import eval_transform

PRE = TINY_PREPROCESS
CLASSES = ["blue", "green", "red"]
SIDE = 13_300


def write_png_bomb(path: Path, side: int = SIDE) -> Path:
    """A valid 1-bit greyscale PNG of ``side`` x ``side`` black pixels, written chunk by chunk (tens of
    KB on disk, 177 million pixels declared) without ever holding the image."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny ImageFolder, free to modify."""
    return Path(shutil.copytree(tiny_data, tmp_path / "images"))


@pytest.fixture
def bomb(data: Path) -> Path:
    return write_png_bomb(data / "red" / "bomb.png")


def test_png_bomb_is_reported_and_skipped_from_its_header(data: Path, bomb: Path) -> None:
    assert bomb.stat().st_size < 1_000_000
    samples = [(p, 0) for p in sorted((data / "blue").glob("*.jpg"))] + [(bomb, 2)]
    started = time.perf_counter()
    good, bad = verify_images(samples)
    assert time.perf_counter() - started < 1.0
    assert good == samples[:-1]
    assert [p for p, _ in bad] == [bomb]
    reason = bad[0][1]  # from the pixel cap, or from Pillow's own bomb check that comes first
    assert "pixels" in reason and ("176,890,000" in reason or "176890000" in reason), reason


def test_read_samples_skips_the_bomb(data: Path, bomb: Path, registries: object, tmp_path: Path) -> None:
    config = load_config(write_tiny_domain(tmp_path / "cfg"))
    good, problems = read_samples(registries, config, data)
    assert len(good) == 30 and bomb not in [p for p, _ in good]
    reasons = dict(problems)
    assert set(reasons) == {bomb, data / "red" / "zz_broken.jpg"}
    assert "pixels" in reasons[bomb]


def test_decode_refuses_oversize_bytes_and_empty_files(data: Path, tmp_path: Path) -> None:
    jpeg = (data / "blue" / "000.jpg").read_bytes()
    assert decode_rgb(jpeg).shape == (36, 44, 3)
    with pytest.raises(DataError, match="over the limit of 100"):
        decode_rgb(jpeg, ImageLimits(max_bytes=100))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_rgb(empty)
    with pytest.raises(DataError, match="empty"):
        decode_rgb(b"")
    good, bad = verify_images([(empty, 0)])
    assert not good and "empty" in bad[0][1]


def test_config_caps_are_respected(data: Path, registries: object, tmp_path: Path) -> None:
    domain = write_tiny_domain(tmp_path / "cfg")
    config = load_config(domain, ["dataset.max_image_pixels=1000"])  # the tiny images are 44 x 36
    assert config.dataset.image_limits() == ImageLimits(max_pixels=1000, max_bytes=50 * 1024 * 1024)
    good, problems = read_samples(registries, config, data)
    assert not good and len(problems) == 31
    assert sum("1,584 pixels, over the limit of 1,000" in why for _, why in problems) == 30
    dataset = ImageDataset(
        [(data / "blue" / "000.jpg", 0)], eval_transform(PRE), config.dataset.image_limits()
    )
    assert dataset[0] is None  # skipped, not decoded
    assert ImageDataset([(data / "blue" / "000.jpg", 0)], eval_transform(PRE))[0] is not None
    for field in ("max_image_pixels", "max_image_bytes"):
        with pytest.raises(ConfigError, match=f"dataset.{field}"):
            load_config(domain, [f"dataset.{field}=0"])


def truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def colour_of(image: np.ndarray) -> int:
    """The class (blue, green, red) of a preprocessed tiny image: its strongest channel."""
    return {2: 0, 1: 1, 0: 2}[int(image.reshape(3, -1).mean(1).argmax())]


def test_export_skips_a_truncated_jpeg_and_keeps_labels_aligned(data: Path) -> None:
    val = [(data / name / f"{i:03d}.jpg", label) for label, name in enumerate(CLASSES) for i in range(3)]
    cut = truncate(data / "green" / "001.jpg")
    good, bad = verify_images(val)
    assert cut in [p for p, _ in good] and not bad  # the header check alone lets it through
    result = load_validation(Split(train=[], val=val, test=[]), eval_transform(PRE))
    assert result.skipped == 1 and result.problems and "green/001.jpg" in result.problems
    assert result.images.shape == (8, 3, 32, 32)
    assert result.labels.tolist() == [label for p, label in val if p != cut]
    assert [colour_of(image) for image in result.images] == result.labels.tolist()


def test_export_refuses_when_no_validation_image_decodes(data: Path) -> None:
    val = [(truncate(data / "red" / f"{i:03d}.jpg"), 2) for i in range(2)]
    with pytest.raises(DataError, match="none of the 2 validation images"):
        load_validation(Split(train=[], val=val, test=[]), eval_transform(PRE))


def test_calibration_skips_truncated_and_bomb_images(data: Path, bomb: Path) -> None:
    train = [(data / "blue" / f"{i:03d}.jpg", 0) for i in range(5)]
    truncate(data / "blue" / "002.jpg")
    split = Split(train=[*train, (bomb, 2)], val=[], test=[])
    batches = list(calibration_batches(split, eval_transform(PRE), count=10, batch_size=2))
    assert sum(len(b) for b in batches) == 4
    assert all(b.dtype == np.float32 and b.shape[1:] == (3, 32, 32) for b in batches)
