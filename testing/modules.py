"""Checks of the torch components: backbones and attention modules.

Backbone (``thali_register_backbones``): the entry metadata carries ``input_size``, ``mean`` and
``std`` (the hookspec also asks for interpolation, crop_pct, weights and licence; thali defaults the
first two); the factory, called as thali's model assembly calls it (``factory(pretrained="none",
**params)``), returns a :class:`thali.core.FeatureBackbone` or a plain ``nn.Module`` with an int
``num_features``, and passes thali's own ``as_feature_backbone`` and ``check_output`` (what ``thali
train`` runs before training); ``(2, 3, H, W)`` images give finite ``(2, num_features, h, w)`` maps; a
backward pass reaches every trainable parameter; the ONNX export runs in ONNX Runtime like torch.
``H = W = 64``, or the backbone's own size when smaller, as ``check_output`` does.

Attention (``thali_register_attention``): ``factory(channels)`` keeps the shape of a non-square input,
backpropagates to its input and parameters, and exports to ONNX with parity.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

from thali.core.registry import Entry

from .checks import (
    ONNX,
    TORCH,
    Check,
    CheckFailed,
    CheckSkipped,
    gradient_report,
    needed,
    onnx_parity,
    params_of,
    perturb,
    require_module,
    shape,
)

BACKBONE_OPTIONS = frozenset({"input_size", "onnx", "params", "tolerance"})
ATTENTION_OPTIONS = frozenset({"channels", "onnx", "params", "tolerance"})
#: What the hookspec says a backbone entry's metadata must carry, and what thali cannot do without
#: (``thali.core.training.backbone.PREPROCESS_KEYS``: it builds a plain module's preprocessing from them).
BACKBONE_METADATA = ("input_size", "mean", "std", "interpolation", "crop_pct", "weights", "licence")
REQUIRED_METADATA = ("input_size", "mean", "std")
SMALL = 64


def is_family(entry: Entry[Any]) -> bool:
    """A ``prefix/*`` entry: it names many components, none of which can be built by that name."""
    return entry.name.endswith("/*")


def _preprocessing_problems(meta: Mapping[str, Any]) -> list[str]:
    """What is wrong with the input_size/mean/std of a metadata or preprocess mapping."""
    problems = []
    size = meta.get("input_size")
    ok_size = (
        isinstance(size, (tuple, list))
        and len(size) == 3
        and all(isinstance(d, Integral) and int(d) > 0 for d in size)
        and size[0] == 3
    )
    if not ok_size:
        problems.append(f"input_size must be (3, H, W), got {size!r}")
    for key in ("mean", "std"):
        value = meta.get(key)
        if not (
            isinstance(value, (tuple, list))
            and len(value) == 3
            and all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
        ):
            problems.append(f"{key} must be 3 numbers, got {value!r}")
        elif key == "std" and any(v <= 0 for v in value):
            problems.append(f"std must be positive, got {value!r}")
    return problems


def backbone_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    if is_family(entry):
        return [Check("family", functools.partial(_family, entry))]
    kit = _BackboneKit(entry, options)
    return [
        Check("metadata", kit.metadata),
        Check("builds", kit.builds, TORCH),
        Check("preprocess", kit.preprocess, TORCH),
        Check("forward", kit.forward, TORCH),
        Check("backward", kit.backward, TORCH),
        Check("onnx parity", kit.onnx, ONNX),
    ]


def _family(entry: Entry[Any]) -> str:
    example = entry.name[:-1] + "<model>"
    raise CheckSkipped(f"a family entry: check one member, e.g. `thali check backbones:{example}`")


class _BackboneKit:
    """The checks of one backbone entry, one method per rule, in the order they run; ``state`` holds
    what an earlier check made for the later ones (the built backbone, the image side)."""

    def __init__(self, entry: Entry[Any], options: Mapping[str, Any]) -> None:
        self.entry = entry
        self.options = options
        self.params = params_of(options)
        self.tolerance = float(options.get("tolerance", 1e-3))
        self.forced = options.get("input_size")
        self.member = bool(entry.metadata.get("family"))  # a member of a family, e.g. timm/resnet18
        self.state: dict[str, Any] = {}

    def metadata(self) -> str:
        if self.member:
            raise CheckSkipped("a family member: its preprocessing is read from the built module")
        meta = self.entry.metadata
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [p for p in _preprocessing_problems(meta) if p.split(" ", 1)[0] not in missing]
        if problems:
            raise CheckFailed("entry metadata: " + "; ".join(problems) + " (see thali_register_backbones)")
        detail = (
            f"input_size {tuple(meta['input_size'])}, mean {tuple(meta['mean'])}, std {tuple(meta['std'])}"
        )
        absent = [k for k in BACKBONE_METADATA if k not in meta]
        if absent:
            detail += f"; not given: {', '.join(absent)} (the hookspec asks for them; thali uses defaults)"
        return detail

    def builds(self) -> str:
        from thali.core.training.backbone import FeatureBackbone, as_feature_backbone

        entry = self.entry
        made = entry.factory(pretrained="none", **self.params)  # as thali's model assembly calls it
        backbone = as_feature_backbone(made, entry.name, entry.who, entry.metadata)
        if len(backbone.stage_channels) != len(backbone.stages):
            raise CheckFailed(
                f"{len(backbone.stages)} stages but {len(backbone.stage_channels)} stage_channels; thali "
                "places attention after stages by these channel counts"
            )
        self.state["backbone"], self.state["plain"] = backbone, not isinstance(made, FeatureBackbone)
        count = sum(p.numel() for p in backbone.parameters())
        if self.state["plain"]:
            what = f"{type(made).__name__}: a plain module, used as one stage"
        else:
            n = len(backbone.stages)
            what = f"{type(made).__name__} with {n} stage{'s' if n != 1 else ''}"
        return f"{what}, num_features {backbone.num_features}, {count:,} parameters"

    def preprocess(self) -> str:
        backbone = needed(self.state, "backbone", "builds")
        if self.state["plain"]:
            return "a plain module: thali takes input_size, mean and std from the entry metadata"
        pre = backbone.preprocess
        problems = _preprocessing_problems(pre)
        if problems:
            raise CheckFailed("the module's preprocess: " + "; ".join(problems))
        if self.member:
            return f"input_size {tuple(pre['input_size'])} (from the module)"
        metadata = self.entry.metadata
        for key in REQUIRED_METADATA:
            if key in metadata and tuple(pre[key]) != tuple(metadata[key]):
                raise CheckFailed(
                    f"the module's preprocess {key} {tuple(pre[key])} differs from the entry metadata's "
                    f"{tuple(metadata[key])}"
                )
        return "input_size, mean and std match the entry metadata"

    def images(self, n: int) -> Any:
        import torch

        side = needed(self.state, "side", "forward")
        return torch.randn(n, 3, side, side)

    def forward(self) -> str:
        import torch

        from thali.core.training.backbone import check_output

        backbone = copy.deepcopy(needed(self.state, "backbone", "builds"))
        check_output(backbone, self.entry.name, self.entry.who)  # what thali runs before training
        size = backbone.preprocess.get("input_size", (3, SMALL, SMALL))
        self.state["side"] = int(self.forced) if self.forced else min(SMALL, int(size[-1]))
        x = self.images(2)
        with torch.no_grad():
            y = backbone.eval()(x)
        if tuple(y.shape[:2]) != (2, backbone.num_features) or y.dim() != 4:
            raise CheckFailed(
                f"returned {shape(y)} from {shape(x)} images; expected (2, {backbone.num_features}, h, w)"
            )
        if not torch.isfinite(y).all():
            raise CheckFailed("the feature maps hold NaN or infinity")
        return f"{shape(x)} -> {shape(y)}"

    def backward(self) -> str:
        backbone = copy.deepcopy(needed(self.state, "backbone", "builds")).train()
        backbone(self.images(2)).float().mean().backward()
        return gradient_report(backbone)

    def onnx(self) -> str:
        if self.options.get("onnx", True) is False:
            raise CheckSkipped("not run (onnx=False)")
        backbone = copy.deepcopy(needed(self.state, "backbone", "builds")).eval()
        return onnx_parity(backbone, [self.images(2), self.images(3)], self.tolerance)


def attention_checks(entry: Entry[Any], registries: Any, options: Mapping[str, Any]) -> list[Check]:
    params = params_of(options)
    tolerance = float(options.get("tolerance", 1e-4))
    channel_counts = [int(c) for c in options.get("channels", (16, 96))]

    def build(channels: int) -> Any:
        return require_module(entry.factory(channels, **params), f"factory({channels})")

    def keeps_shape(channels: int) -> str:
        import torch

        module = build(channels).train()
        x = torch.randn(3, channels, 7, 5)
        y = module(x)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            raise CheckFailed(f"output {shape(y)} from input {shape(x)}; attention must keep the shape")
        if not torch.isfinite(y).all():
            raise CheckFailed("the output holds NaN or infinity")
        return f"{shape(x)} kept"

    def backward(channels: int) -> str:
        import torch

        module = build(channels).train()
        x = torch.randn(3, channels, 7, 5, requires_grad=True)
        module(x).square().mean().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise CheckFailed("no finite gradient reaches the input")
        if not any(True for _ in module.parameters()):
            return "gradient reaches the input (no parameters)"
        return gradient_report(module) + " and the input"

    def onnx(channels: int) -> str:
        import torch

        if options.get("onnx", True) is False:
            raise CheckSkipped("not run (onnx=False)")
        module = build(channels)
        perturb(module)
        return onnx_parity(
            module, [torch.randn(2, channels, 7, 5), torch.randn(3, channels, 7, 5)], tolerance
        )

    checks = []
    for c in channel_counts:
        checks.append(Check(f"keeps shape ({c} ch)", functools.partial(keeps_shape, c), TORCH))
        checks.append(Check(f"backward ({c} ch)", functools.partial(backward, c), TORCH))
    last = channel_counts[-1]
    checks.append(Check(f"onnx parity ({last} ch)", lambda: onnx(last), ONNX))
    return checks
