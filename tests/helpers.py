"""Helpers shared by tests: the real thali command and a real third-party plugin distribution."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Run the real ``thali`` console script in a subprocess.

    For tests where the process boundary is the point (the installed console script, signals, a fresh
    interpreter's imports or entry points); everything else uses :func:`thali_in_process`."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*thali_command(), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


@dataclass(frozen=True)
class Result:
    """What one ``thali`` command gave: the fields of ``subprocess.CompletedProcess`` the tests read."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


class InProcessTimeout(BaseException):
    """A command ran past its limit (a BaseException, so no ``except Exception`` in thali swallows it)."""


# The warning filters of a plain `python` (no -W, no -X dev): what a fresh `thali` process shows.
_INTERPRETER_WARNING_FILTERS: tuple[tuple[Any, type[Warning], str], ...] = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _fds_captured() -> Iterator[tuple[Any, Any]]:
    """File descriptors 1 and 2, and ``sys.stdout`` / ``sys.stderr`` over them, into two temporary
    files: what a subprocess's pipes would get, C-level writes (ONNX Runtime's log) included."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        streams = sys.stdout, sys.stderr
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.flush()
        _flush_c_stdio()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
        try:
            yield out, err
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            _flush_c_stdio()
            sys.stdout, sys.stderr = streams
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`InProcessTimeout` after ``seconds`` (main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise InProcessTimeout(f"thali ran past {seconds:.0f} s in process")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _state_restored() -> Iterator[None]:
    """Put back what a command may change in this process: the environment, the working folder,
    sys.path, the root logger (``logging.basicConfig`` in train/export/serve) and every logger's level.
    Modules imported from a temporary folder (a test's plugin distribution) are forgotten, so the next
    command imports them afresh, as a new process would."""
    environ, cwd, path, modules = dict(os.environ), os.getcwd(), list(sys.path), set(sys.modules)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    # no pytest handler on the root logger while the command runs: its records reach stderr (its own
    # basicConfig, or logging's last resort) as they would in a process of its own
    for handler in handlers:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, logger in logging.Logger.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))
        os.chdir(cwd)
        sys.path[:] = path
        if os.environ != environ:
            os.environ.clear()
            os.environ.update(environ)
        temp = os.path.realpath(tempfile.gettempdir()) + os.sep
        for name in set(sys.modules) - modules:
            file = getattr(sys.modules.get(name), "__file__", None)
            if file and os.path.realpath(file).startswith(temp):
                del sys.modules[name]


def thali_in_process(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """Run ``thali ARGS`` by calling its entry point in this process: the result of :func:`run_thali`
    (exit code, and stdout / stderr as a subprocess's pipes would hold them) without starting an
    interpreter and importing torch again. ``env`` is set for the call only."""
    from thali.core.cli.main import main

    argv = [str(a) for a in args]
    with _state_restored(), _fds_captured() as (out, err), warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(_INTERPRETER_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = _show_warning
        os.environ.update(env or {})
        try:
            with _time_limit(timeout):
                code: Any = main(argv)
        except SystemExit as exc:  # argparse (usage errors, --help, --version) exits
            code = exc.code
        except Exception:  # what the interpreter does with an uncaught error: a traceback, status 1
            traceback.print_exc()
            code = 1
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8")
        stderr = err.read().decode("utf-8", "backslashreplace")
    return Result(["thali", *argv], code or 0, stdout, stderr)


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
