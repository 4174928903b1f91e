"""``thali check`` and :mod:`thali.testing`: the conformance kit passes thali's own components, and a
third-party plugin that breaks the contract gets a report naming the plugin, its distribution, the
component and the failing check (exit code 1, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import thali_in_process, use_site

from thali.core import build_plugin_manager, hookimpl
from thali.testing import (
    CheckResult,
    assert_conformant,
    check_component,
    check_plugin,
    format_report,
    summary,
)

BROKEN_PLUGIN = '''
"""A third-party plugin whose components break the contract in the ways authors do."""
from thali.core import hookimpl


def shrink(channels, **params):
    from torch import nn

    return nn.Conv2d(channels, max(1, channels // 2), 1)  # attention must keep the shape


def per_sample(num_classes, class_counts=None, **params):
    import torch.nn.functional as F

    def loss(logits, target):
        return F.cross_entropy(logits, target, reduction="none")  # one value per image, not a scalar

    return loss


def pooled(num_classes=0, pretrained="none", **params):
    from torch import nn

    module = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    module.num_features = 8  # (N, 8), not 4-D feature maps
    return module


def exploding(root, classes=None, **params):
    raise RuntimeError("cannot read this layout")


@hookimpl
def thali_register_attention(registry):
    registry.add("shrink", shrink, description="halves the channels")


@hookimpl
def thali_register_losses(registry):
    registry.add("per_sample", per_sample, description="forgets to reduce")


@hookimpl
def thali_register_backbones(registry):
    registry.add(
        "pooled",
        pooled,
        metadata={"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    )


@hookimpl
def thali_register_datasets(registry):
    registry.add("exploding", exploding)
'''
DIST, VERSION, PLUGIN = "thali-broken-demo", "0.3.1", "broken_demo"


def write_broken_distribution(site: Path) -> Path:
    """A real installed distribution (package + dist-info with an entry point) in ``site``."""
    package = site / "thali_broken_demo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(BROKEN_PLUGIN))
    info = site / f"thali_broken_demo-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
    (info / "entry_points.txt").write_text(f"[thali]\n{PLUGIN} = thali_broken_demo\n")
    (info / "top_level.txt").write_text("thali_broken_demo\n")
    return site


@pytest.fixture
def broken_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_site(write_broken_distribution(tmp_path / "site"), monkeypatch)


def test_thali_check_passes_builtin_plugins() -> None:
    done = thali_in_process(
        "check", "thali.plugins.losses", "thali.plugins.attention_se", "thali.plugins.datasets"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "thali.plugins.losses  [thali " in out and "thali.plugins.attention_se  [thali " in out
    assert "✓ losses focal: soft targets (" in out
    assert "✓ attention se: onnx parity (96 ch) (" in out
    assert "✓ datasets imagefolder: reads a tiny data set (" in out
    assert "✗" not in out and "Traceback" not in done.stderr
    assert out.strip().splitlines()[-1] == "18 passed, 0 failed, 0 skipped"


def test_thali_check_reports_a_broken_third_party_plugin(broken_site: Path) -> None:
    done = thali_in_process("check", PLUGIN)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "Traceback" not in out + done.stderr
    assert f"{PLUGIN}  [{DIST} {VERSION}]" in out
    where = f"[plugin {PLUGIN!r}, {DIST} {VERSION}]"
    lines = out.splitlines()

    def line(start: str) -> str:
        found = [x.strip() for x in lines if x.strip().startswith(start)]
        assert found, f"no line starting with {start!r} in:\n{out}"
        return found[0]

    shape = line("✗ attention shrink: keeps shape (16 ch)")
    assert "output (3, 8, 7, 5) from input (3, 16, 7, 5)" in shape and shape.endswith(where)
    assert line("✗ losses per_sample: index targets").count("(6,)") == 1
    assert "a loss is a scalar" in line("✗ losses per_sample: soft targets")
    assert "must return 4-D feature maps" in line("✗ backbones pooled: forward")
    assert line("- backbones pooled: onnx parity").endswith("not run: forward did not succeed")
    assert "RuntimeError: cannot read this layout" in line("✗ datasets exploding: reads a tiny data set")
    assert line("✓ losses per_sample: builds")
    assert all(where in x or x.count(f"(plugin {PLUGIN!r}, {DIST} {VERSION})") for x in lines if "✗" in x)
    assert lines[-1].endswith("skipped") and " 0 failed" not in lines[-1]

    by_dist = thali_in_process("check", DIST, "--kind", "losses")
    assert by_dist.returncode == 1 and "✗ losses per_sample: index targets" in by_dist.stdout
    assert "attention" not in by_dist.stdout
    one = thali_in_process("check", "loss:per_sample", "--json")
    assert one.returncode == 1
    report = json.loads(one.stdout)
    assert report["summary"] == {"passed": 1, "failed": 2, "skipped": 0}
    failed = [r for r in report["results"] if r["status"] == "failed"]
    assert [r["check"] for r in failed] == ["index targets", "soft targets"]
    assert all(r["plugin"] == PLUGIN and r["distribution"] == f"{DIST} {VERSION}" for r in failed)


def test_an_unknown_target_is_one_line_naming_what_exists() -> None:
    done = thali_in_process("check", "no_such_thing")
    assert done.returncode == 2 and done.stdout == ""
    (message,) = done.stderr.strip().splitlines()
    assert message.startswith(
        "error: check: 'no_such_thing' is not a loaded plugin, distribution or component"
    )
    assert "thali.plugins.losses" in message and "distributions: thali" in message
    bad_kind = thali_in_process("check", "gizmos:se")
    assert bad_kind.returncode == 2 and "unknown component kind 'gizmos'" in bad_kind.stderr


def test_without_torch_the_torch_checks_are_skipped_with_the_extra_to_install() -> None:
    """A serving-only install: thali.testing imports, torch checks say which extra they need."""
    script = textwrap.dedent(
        """
        import sys

        class NoTrainingExtra:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "timm", "onnx", "onnxscript", "albumentations"}:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoTrainingExtra())
        import thali.testing
        assert "torch" not in sys.modules
        from thali.core.cli.main import main
        sys.exit(main(["--no-autoload", "check", "thali.plugins.losses", "thali.plugins.datasets"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "- losses focal: index targets (0.00 s) — needs pip install 'thali[train]' (torch not installed)"
        in (done.stdout)
    )
    assert "✓ datasets imagefolder: reads a tiny data set" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "4 passed, 0 failed, 9 skipped"


# --- the Python API, in process ----------------------------------------------------------------------


class PlainFunctionLoss:
    """A plugin object (not a module) whose loss is a plain function, as the hookspec allows."""

    @staticmethod
    def make(num_classes: int, class_counts: object = None, **params: object) -> object:
        import torch

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if target.dim() == 1:
                target = torch.nn.functional.one_hot(target, num_classes).float()
            return -(target * torch.log_softmax(logits, -1)).sum(-1).mean()

        return loss

    @hookimpl
    def thali_register_losses(self, registry: object) -> None:
        registry.add("plain_ce", self.make, description="cross-entropy as a plain function")


def test_check_component_passes_a_plain_function_loss() -> None:
    pm = build_plugin_manager(autoload=False, plugins=[("plain", PlainFunctionLoss())])
    results = check_component(pm, "losses", "plain_ce")
    assert [r.check for r in results] == ["builds", "index targets", "soft targets"]
    assert [r.status for r in results] == ["passed"] * 3, format_report(results)
    assert "a plain callable (not an nn.Module)" in results[0].detail
    assert all(r.plugin == "plain" and r.distribution is None for r in results)
    assert_conformant(results)
    assert [r.status for r in check_plugin(pm, "plain")] == ["passed"] * 3


def test_check_component_never_raises_for_a_broken_component(broken_site: Path) -> None:
    pm = build_plugin_manager()
    results = check_component(pm, "attention", "shrink", channels=(16,), onnx=False)
    assert [(r.check, r.status) for r in results] == [
        ("keeps shape (16 ch)", "failed"),
        ("backward (16 ch)", "passed"),  # each check on its own: the gradients do flow
        ("onnx parity (16 ch)", "skipped"),
    ]
    assert results[0].distribution == f"{DIST} {VERSION}"
    with pytest.raises(AssertionError, match=r"conformance check\(s\) failed \(attention shrink\)") as info:
        assert_conformant(results)
    assert "✗ attention shrink: keeps shape (16 ch)" in str(info.value)
    with pytest.raises(TypeError, match="unknown option"):
        check_component(pm, "attention", "shrink", chanels=(16,))


def test_report_format() -> None:
    results = [
        CheckResult("losses", "focal", "p", "builds", "passed", "ok", 0.123, "thali 0.1.0"),
        CheckResult("losses", "focal", "p", "soft targets", "failed", "not a scalar", 0.5, "thali 0.1.0"),
        CheckResult("losses", "focal", "p", "index targets", "skipped", "no torch", 0.0, "thali 0.1.0"),
    ]
    assert format_report(results).splitlines() == [
        "p  [thali 0.1.0]",
        "  ✓ losses focal: builds (0.12 s) — ok",
        "  ✗ losses focal: soft targets (0.50 s) — not a scalar [plugin 'p', thali 0.1.0]",
        "  - losses focal: index targets (0.00 s) — no torch",
    ]
    assert summary(results) == "1 passed, 1 failed, 1 skipped"
