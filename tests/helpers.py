"""Helpers shared by tests: the real thali command and a real third-party plugin distribution."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find_datasets() -> Path | None:
    """$THALI_DATA, else ../shared/datasets beside the checkout."""
    for candidate in (os.environ.get("THALI_DATA"), REPO.parent / "shared" / "datasets"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def thali_command() -> list[str]:
    script = Path(sys.executable).parent / "thali"
    if script.exists():
        return [str(script)]
    found = shutil.which("thali")
    return [found] if found else [sys.executable, "-m", "thali.core.cli"]


def run_thali(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``thali`` console script in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*thali_command(), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


DEMO_PLUGIN = '''
"""A third-party thali plugin: a loss and a domain pack of its own."""
from pathlib import Path

from thali.core import hookimpl, register_domain_dir


def make_l1(num_classes, class_counts=None, **params):
    import torch

    def loss(logits, target):
        onehot = torch.nn.functional.one_hot(target, num_classes).float()
        return (torch.softmax(logits, -1) - onehot).abs().sum(-1).mean()

    return loss


@hookimpl
def thali_register_losses(registry):
    registry.add("demo_l1", make_l1, description="L1 between probabilities and one-hot targets")


@hookimpl
def thali_register_domains(registry):
    register_domain_dir(registry, Path(__file__).parent / "retail_demo")
'''

DEMO_DOMAIN = """
name: retail_demo
description: A demo shelf-product domain from a third-party plugin.
classes:
  - {name: cereal, display_name: Cereal box}
  - {name: soap, display_name: Soap bar}
model: {backbone: tf_efficientnet_lite0, pretrained: none}
loss: {name: demo_l1, label_smoothing: 0.0}
"""


def write_demo_distribution(
    site: Path, plugin_name: str = "demo", package: str = "thali_demo_plugin"
) -> Path:
    """Write a real installed distribution (package + dist-info with entry_points.txt) into ``site``."""
    pkg = site / package
    (pkg / "retail_demo").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(DEMO_PLUGIN))
    (pkg / "retail_demo" / "domain.yaml").write_text(DEMO_DOMAIN)
    info = site / f"{package}-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thali-demo-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[thali]\n{plugin_name} = {package}\n")
    (info / "top_level.txt").write_text(f"{package}\n")
    return site


def onnx_roundtrip(module: object, example: object, path: Path) -> object:
    """Export ``module`` with the dynamo exporter (opset 18, dynamic batch) and run it in ONNX Runtime.

    Returns the ONNX Runtime output for ``example`` as a numpy array.
    """
    import onnxruntime as ort

    from thali.core.training.onnx import export_onnx

    export_onnx(module, example, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": example.numpy()})[0]


# the preprocessing spec of a 32 px model, for transform and data tests
TINY_PREPROCESS = {
    "input_size": (3, 32, 32),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}

TINY_DOMAIN = """
name: tiny
classes: [{name: blue}, {name: green}, {name: red}]
model:
  backbone: se_cnn
  pretrained: none
  params: {width: 8, num_stages: 2, input_size: 32}
  attention: [{name: se}]
training: {mode: full, epochs: 2, batch_size: 8, num_workers: 0, seed: 3}
augmentation: {mixup_alpha: 0.2, mix_prob: 0.5}
dataset: {split: {val: 0.25, test: 0.0, seed: 1}}
"""


def write_tiny_imagefolder(root: Path, per_class: int = 10, broken: bool = True) -> Path:
    """Three colour classes of small noisy JPEGs (and one broken file), made here, not copied."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
    for name, colour in colours.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 35, (36, 44, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")
    if broken:
        (root / "red" / "zz_broken.jpg").write_bytes(b"this is not an image")
    return root


def write_tiny_domain(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "domain.yaml"
    path.write_text(TINY_DOMAIN + extra)
    return path


def read_until(process: subprocess.Popen[str], prefix: str, seconds: float) -> str:
    """The output of ``process`` (text, stdout piped) up to and including the first line starting
    with ``prefix``, or all of it when the process ends or ``seconds`` pass first."""
    import time

    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if line.startswith(prefix):
            break
    return "".join(lines)


def use_site(site: Path, monkeypatch: object) -> Path:
    """Put a folder of installed distributions on sys.path and PYTHONPATH (for subprocesses), with
    third-party plugin loading on, for one test."""
    monkeypatch.syspath_prepend(str(site))  # type: ignore[attr-defined]
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)  # type: ignore[attr-defined]
    monkeypatch.delenv("THALI_DISABLE_PLUGIN_AUTOLOAD", raising=False)  # type: ignore[attr-defined]
    monkeypatch.delenv("THALI_BLOCK_PLUGINS", raising=False)  # type: ignore[attr-defined]
    return site


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            table[int(pid)] = (int(ppid), state)
        except (OSError, ValueError):
            continue  # gone while we looked
    return table


def descendants(root: int) -> set[int]:
    """Every process under ``root`` now (thali up puts the API and the UI in groups of their own)."""
    table, found, todo = processes(), set(), [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent]
        found.update(children)
        todo += children
    return found


def alive(pids: set[int]) -> list[str]:
    """Command lines (and threads) of those of ``pids`` still running; a zombie left to an init that
    does not reap is a finished process, not a survivor."""
    alive, table = [], processes()
    for pid in sorted(pids):
        if pid in table and table[pid][1] != "Z":
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
                threads = sorted(
                    f"{(t / 'comm').read_text().strip()}@{(t / 'wchan').read_text().strip()}"
                    for t in Path(f"/proc/{pid}/task").iterdir()
                )
                alive.append(f"{pid} {command} threads={threads}")
    return alive


def kill_tree(process: subprocess.Popen[str], also: set[int] | None = None) -> None:
    """SIGKILL ``process``, its group and everything under it (``thali up`` starts the API and the UI
    in groups of their own), so nothing of a failed test outlives it."""
    for pid in descendants(process.pid) | (also or set()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
