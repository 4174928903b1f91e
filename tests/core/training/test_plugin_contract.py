"""The hookspec docstrings are the contract: a third-party plugin written from them alone (a plain
``nn.Module`` backbone with ``num_features``, a plain-function loss, an attention module, a dataset
reader) trains, exports and serves; and every way of breaking the contract is one line naming the
component, the plugin and its distribution, never a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers import thali_command

PLUGIN = '''
"""Written from thali.core.hookspecs alone."""
from pathlib import Path
from types import SimpleNamespace

from thali.core import hookimpl

META = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear", "crop_pct": 0.875, "weights": ["none"], "licence": "MIT"}


def doc_cnn(num_classes=0, pretrained="none", width=16):
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_features = 2 * width
            self.body = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())

        def forward(self, x):
            return self.body(x)

    return Net()


def doc_gate(channels):
    import torch
    from torch import nn

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(channels, 1, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.conv(x))

    return Gate()


def doc_l2(num_classes, class_counts=None, **params):
    import torch.nn.functional as F

    def loss(logits, target):
        if target.dim() == 1:
            target = F.one_hot(target, num_classes).float()
        return ((logits.softmax(-1) - target) ** 2).sum(-1).mean()

    return loss


def doc_flat(root, classes=None):
    files = sorted(Path(root).glob("*.jpg"))
    names = list(classes) if classes else sorted({f.name.split("_")[0] for f in files})
    samples = [(f, names.index(f.name.split("_")[0])) for f in files if f.name.split("_")[0] in names]
    return SimpleNamespace(classes=names, samples=samples, problems=[])


def bad_dict(num_classes=0, pretrained="none"):
    return {"features": 8}


def bad_nofeat(num_classes=0, pretrained="none"):
    from torch import nn
    return nn.Conv2d(3, 8, 3)


def bad_shape(num_classes=0, pretrained="none"):
    from torch import nn

    class Pooled(nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    return Pooled()


def bad_raise(num_classes=0, pretrained="none"):
    raise RuntimeError("weights file missing")


def bad_vector(num_classes, class_counts=None, **params):
    import torch.nn.functional as F
    return lambda logits, target: F.cross_entropy(logits, target, reduction="none")


def bad_notcallable(num_classes, class_counts=None, **params):
    return 3


def bad_soft(num_classes, class_counts=None, **params):
    import torch.nn.functional as F
    return lambda logits, target: F.nll_loss(logits.log_softmax(-1), target.long())


@hookimpl
def thali_register_backbones(registry):
    for name, factory in [("doc_cnn", doc_cnn), ("bad_dict", bad_dict), ("bad_nofeat", bad_nofeat),
                          ("bad_shape", bad_shape), ("bad_raise", bad_raise)]:
        registry.add(name, factory, metadata=META)


@hookimpl
def thali_register_attention(registry):
    registry.add("doc_gate", doc_gate)


@hookimpl
def thali_register_losses(registry):
    for name, factory in [("doc_l2", doc_l2), ("bad_vector", bad_vector),
                          ("bad_notcallable", bad_notcallable), ("bad_soft", bad_soft)]:
        registry.add(name, factory)


@hookimpl
def thali_register_datasets(registry):
    registry.add("doc_flat", doc_flat)
'''

DOMAIN = """
name: docplug
classes: [{name: blue}, {name: green}, {name: red}]
dataset: {name: doc_flat, split: {val: 0.25, test: 0.0, seed: 1}}
model: {backbone: doc_cnn, pretrained: none, attention: [{name: doc_gate}]}
loss: {name: doc_l2}
augmentation: {mixup_alpha: 0.2, mix_prob: 0.5}
optimizer: {lr: 0.01}
training: {mode: full, epochs: 6, batch_size: 8, num_workers: 0, seed: 3}
export: {variants: [fp32]}
"""
WHO = "plugin 'docplug', thali-docstring-plugin 0.3.1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real installed distribution (dist-info with an entry point), on sys.path and PYTHONPATH."""
    import sys

    site = tmp_path_factory.mktemp("site")
    (site / "thali_docplug.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "thali_docstring_plugin-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thali-docstring-plugin\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text("[thali]\ndocplug = thali_docplug\n")
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))


@pytest.fixture(scope="module")
def plugins(site: Path) -> object:
    from thali.core import build_plugin_manager

    pm = build_plugin_manager(autoload=True)
    assert "docplug" in [p.name for p in pm.plugins()]
    return pm


def _config(tmp_path: Path, *overrides: str) -> object:
    from thali.core import load_config

    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "domain.yaml").write_text(DOMAIN)
    return load_config(tmp_path / "cfg" / "domain.yaml", list(overrides))


def _photos(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, colour in {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}.items():
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.jpg")
    return folder


def test_a_plugin_written_from_the_docstrings_trains_exports_and_serves(
    plugins: object, tmp_path: Path
) -> None:
    from thali.api import create_app
    from thali.api.settings import Settings
    from thali.core.exporting.pipeline import export_run
    from thali.core.training.trainer import TrainOptions, train
    from thali.registry import ModelRegistry

    registries = plugins.registries  # type: ignore[attr-defined]
    data = _photos(tmp_path / "photos")
    result = train(
        _config(tmp_path), registries, TrainOptions(tmp_path / "run", data=str(data), progress=False)
    )
    assert result["finished"] and result["metrics"]["val"]["top1"] >= 0.8, result["metrics"]["val"]
    report = export_run(tmp_path / "run", registries, out_dir=tmp_path / "export", progress=False)
    assert "fp32" in report["variants"]
    ModelRegistry(tmp_path / "registry", cache_dir=tmp_path / "cache").publish(tmp_path / "export")

    app = create_app(Settings(registry=str(tmp_path / "registry")), plugins)
    photo = (data / "red_011.jpg").read_bytes()
    answer = app.test_client().post(
        "/v1/domains/docplug/predict", data={"image": (io.BytesIO(photo), "r.jpg")}
    )
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["predictions"][0]["label"] == "red"


def test_a_plain_backbone_in_frozen_features_mode_trains_whole_and_says_so(
    plugins: object, tmp_path: Path
) -> None:
    from thali.core.training.trainer import TrainOptions, train

    config = _config(tmp_path, "training.mode=frozen_features", "training.epochs=1")
    options = TrainOptions(tmp_path / "run", data=str(_photos(tmp_path / "photos")), progress=False)
    result = train(config, plugins.registries, options)  # type: ignore[attr-defined]
    assert result["finished"]
    assert any("nothing of doc_cnn is frozen" in note and "full mode" in note for note in result["notes"])


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("model.backbone=bad_dict", "'bad_dict' ({who}) returned dict, not a torch.nn.Module"),
        ("model.backbone=bad_nofeat", "'bad_nofeat' ({who}) returned a Conv2d without an integer"),
        ("model.backbone=bad_shape", "'bad_shape' ({who}) returned (2, 8) from (2, 3, 32, 32) images"),
        ("model.backbone=bad_raise", "'bad_raise' ({who}) failed to build: RuntimeError: weights file"),
    ],
)  # fmt: skip
def test_a_backbone_that_breaks_the_contract_is_one_line(
    plugins: object, tmp_path: Path, override: str, says: str
) -> None:
    from thali.core.errors import PluginError
    from thali.core.training.model import build_classifier

    with pytest.raises(PluginError) as caught:
        build_classifier(_config(tmp_path, override, "model.attention=[]"), plugins.registries)  # type: ignore[attr-defined]
    assert f"backbone {says.format(who=WHO)}" in caught.value.message and "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("loss.name=bad_vector", "'bad_vector' ({who}) returned (2,) for class-index targets"),
        ("loss.name=bad_notcallable", "'bad_notcallable' ({who}) returned int, not a callable"),
        ("loss.name=bad_soft", "'bad_soft' ({who}) failed on (2, 3) logits with soft (mixup/cutmix) targets"),
    ],
)  # fmt: skip
def test_a_loss_that_breaks_the_contract_is_one_line(
    plugins: object, tmp_path: Path, override: str, says: str
) -> None:
    from thali.core.errors import PluginError
    from thali.core.training.loss import build_loss

    with pytest.raises(PluginError) as caught:
        build_loss(_config(tmp_path, override), plugins.registries, [4, 4, 4])  # type: ignore[attr-defined]
    assert f"loss {says.format(who=WHO)}" in caught.value.message and "\n" not in caught.value.message


def test_thali_train_reports_a_broken_plugin_in_one_line(site: Path, tmp_path: Path) -> None:
    _config(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("THALI_DISABLE_PLUGIN_AUTOLOAD", None)
    done = subprocess.run(
        [*thali_command(), "train", str(tmp_path / "cfg" / "domain.yaml"),
         "--data", str(_photos(tmp_path / "p")), "--set", "model.backbone=bad_shape",
         "--set", "model.attention=[]", "--run-dir", str(tmp_path / "run"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "error: backbone 'bad_shape' (plugin 'docplug', thali-docstring-plugin 0.3.1)"
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
