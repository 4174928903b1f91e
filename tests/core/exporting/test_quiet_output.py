"""``thali train`` and ``thali export`` print our lines only: no third-party chatter.

Before the fix a frozen-features ``thali train`` printed the onnxscript / onnx_ir optimiser's INFO log
(``Removed 51 unused nodes``, ``Replaced initializer 'val_62' with existing initializer 'val_38'``,
``Applied 9 of general pattern rewrite rules.``, ...) between the epoch lines, and an export in a
process logging at INFO added ONNX Runtime's quantisation log (``Quantization parameters for tensor:"relu"
not specified``, logged on the root logger). See :mod:`thali.core.quiet`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import thali_command, write_tiny_domain

from thali.core.quiet import quiet

CHATTER = re.compile(
    r"Replaced initializer|Removed \d+ unused|unused functions|constant folding|pattern rewrite|PassManager"
    r"|onnxscript|onnx_ir|torch\.onnx|\[torch\.onnx\]|torch\.export|symbolic shape inference"
    r"|Quantization parameters|pre-?processing before quantization|quantiz"
    r"|Warning:|UserWarning|DeprecationWarning|FutureWarning|RuntimeWarning"
    r"|\[[WE]:onnxruntime|Albumentations|TensorFlow|tensorboard|timm"
)
# Every line `thali train` / `thali export` may print with --no-progress.
TRAIN_OUT = re.compile(r"^(note: .+|tiny: val top-1 .+|run: .+)$")
TRAIN_ERR = re.compile(r"^epoch +\d+/\d+  train loss .+$")
EXPORT_OUT = re.compile(
    r"^(tiny: export in .+|  parity with torch: .+|  graph optimisation: \d+ -> \d+ nodes"
    r"|  (fp32|int8|int8_dynamic|fp16) +model(\.\w+)?\.onnx .+|  \S+ +NOT WRITTEN: .+|warning: .+"
    r"|  unknown flag  \w+: flags .+)$"
)


def _thali(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, without NO_ALBUMENTATIONS_UPDATE: thali itself must keep albumentations quiet."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    return subprocess.run([*thali_command(), *args], capture_output=True, text=True, env=env, timeout=180)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _check(result: subprocess.CompletedProcess[str], out: re.Pattern[str], err: re.Pattern[str]) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    chatter = [line for line in _lines(result.stdout + "\n" + result.stderr) if CHATTER.search(line)]
    assert not chatter, "third-party chatter:\n" + "\n".join(chatter[:20])
    strangers = [line for line in _lines(result.stdout) if not out.match(line)]
    strangers += [line for line in _lines(result.stderr) if not err.match(line)]
    assert not strangers, "lines that are not thali's:\n" + "\n".join(strangers[:20])


@pytest.fixture(scope="module")
def frozen_train(
    tmp_path_factory: pytest.TempPathFactory, tiny_data: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`thali train` of the tiny domain in frozen-features mode: its frozen part is exported to ONNX (by
    the dynamo exporter and the onnxscript optimiser, the chattiest step) and run in ONNX Runtime."""
    root = tmp_path_factory.mktemp("quiet")
    run = root / "run"
    result = _thali(
        "train",
        str(write_tiny_domain(root / "cfg")),
        "--data",
        str(tiny_data),
        "--run-dir",
        str(run),
        "--no-progress",
        "--set",
        "training.mode=frozen_features",
        "--set",
        "training.trainable_stages=1",
        "--set",
        "training.cache_views=1",
        "--set",
        "training.epochs=2",
    )
    return result, run


@pytest.mark.slow
def test_train_prints_only_our_lines(frozen_train: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, run = frozen_train
    _check(result, TRAIN_OUT, TRAIN_ERR)
    assert "note: cached frozen features with onnxruntime" in result.stdout  # the ONNX path ran
    assert f"run: {run}" in result.stdout and "tiny: val top-1" in result.stdout
    assert len(re.findall(r"^epoch +\d/2 ", result.stderr, re.M)) == 2


@pytest.mark.slow
def test_export_prints_only_our_lines(frozen_train: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    train, run = frozen_train
    assert train.returncode == 0, train.stderr[-3000:]
    result = _thali(
        "export",
        str(run),
        "--no-progress",
        "--variants",
        "int8,int8_dynamic,fp16",
        "--set",
        "export.unknown.stages=[0, 1]",
    )
    _check(result, EXPORT_OUT, re.compile(r"^$"))
    assert "parity with torch: max logit difference" in result.stdout
    for variant in ("fp32", "int8", "int8_dynamic", "fp16"):
        assert re.search(rf"^  {variant} +model\.", result.stdout, re.M), result.stdout
    assert "warning: int8_dynamic: dynamic quantisation is slow" in result.stdout  # our own warning stays
    assert "  unknown flag  knn_residual: flags " in result.stdout
    # the earlier stages it reads, at the default weight (no out-of-domain photos to choose another)
    assert re.search(
        r"^  unknown flag  knn_residual: flags .*; stages 0, 1 at weight 0\.5$", result.stdout, re.M
    )


# --- in-process: a host that logs at INFO (what `thali train` sets up) still sees no library chatter ---


class _Stderr(logging.StreamHandler):
    """A console handler that writes to whatever ``sys.stderr`` is when a record comes (capfd's)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


@pytest.fixture
def chatty_root(capfd: pytest.CaptureFixture[str]) -> Iterator[logging.Handler]:
    """The root logger at INFO with a console handler, like the CLI's logging.basicConfig."""
    root, handler = logging.getLogger(), _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.slow
def test_exporters_print_nothing_of_the_libraries_at_info(
    tmp_path: Path, registries: object, chatty_root: logging.Handler, capfd: pytest.CaptureFixture[str]
) -> None:
    import torch

    from thali.core import load_config
    from thali.core.export import ExportContext
    from thali.core.training.model import build_classifier
    from thali.plugins.exporter_int8 import DynamicInt8

    torch.manual_seed(0)
    model = build_classifier(load_config(write_tiny_domain(tmp_path / "cfg")), registries).eval()
    context = ExportContext(model=model, example=torch.randn(4, 3, 32, 32), out_dir=tmp_path)
    capfd.readouterr()
    for name in ("onnx", "int8_dynamic", "fp16"):  # dynamo export, quant_pre_process, ORT quantisation
        registries.exporters.create(name).run(context)
    out, err = capfd.readouterr()
    assert not [line for line in _lines(out + err) if CHATTER.search(line)], out + err
    assert _lines(out) == [f"warning: {DynamicInt8.WARNING}"]
    assert not _lines(err), err


def test_quiet_keeps_our_records_and_bars(
    chatty_root: logging.Handler, capfd: pytest.CaptureFixture[str]
) -> None:
    from tqdm import tqdm

    bar = tqdm(total=2, desc="ours", file=sys.stderr)
    bar.update()
    with quiet("a library call"):
        print("library print")
        os.write(2, b"library C++ log\n")
        logging.getLogger("onnx_ir.passes").info("Removed 3 unused nodes")
        logging.info("Quantization parameters for tensor:x not specified")
        warnings.warn("library warning", UserWarning, stacklevel=1)
        logging.getLogger("thali.export").warning("our own warning, from a calibration reader")
    bar.update()
    bar.close()
    out, err = capfd.readouterr()
    assert "library" not in out + err and "Removed 3" not in err and "Quantization" not in err
    assert "our own warning, from a calibration reader" in err
    assert "ours: 100%" in err  # the bar made before the block renders after it
    logging.getLogger("onnx_ir.passes").info("after the block")  # the library's logger is back
    assert "after the block" in capfd.readouterr().err


def test_quiet_logs_the_tail_at_debug_when_the_call_fails(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="thali.quiet"),
        pytest.raises(ValueError, match="boom"),
        quiet("a failing call"),
    ):
        print("the line that explains it")
        raise ValueError("boom")
    logged = [r.getMessage() for r in caplog.records if r.name == "thali.quiet"]
    assert any("a failing call failed" in m and "the line that explains it" in m for m in logged), logged
