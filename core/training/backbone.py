"""The backbone shape every backbone plugin returns: stem, stages, head, and its preprocessing.

Splitting a backbone into stages is what lets thali place attention after chosen stages, freeze the
first stages for partial fine-tuning, and run the frozen part once (in ONNX Runtime) to cache features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thali.core.errors import ConfigError, DataError, PluginError, one_line
from thali.core.images import DEFAULT_CROP_PCT, interpolation_flag


class FeatureBackbone(nn.Module):
    """``images -> stem -> stages[0..n-1] -> head -> (N, num_features, h, w)``.

    ``stage_channels[i]`` is the channel count after ``stages[i]``. ``preprocess`` holds what the
    weights expect: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        head: nn.Module,
        *,
        num_features: int,
        stage_channels: Sequence[int],
        preprocess: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.num_features = int(num_features)
        self.stage_channels = list(stage_channels)
        self.preprocess = dict(preprocess)

    def forward_until(self, x: torch.Tensor, n_stages: int) -> torch.Tensor:
        """Run the stem and the first ``n_stages`` stages."""
        x = self.stem(x)
        for stage in self.stages[:n_stages]:
            x = stage(x)
        return x

    def forward_from(self, x: torch.Tensor, n_stages: int) -> torch.Tensor:
        """Run the stages after the first ``n_stages``, then the head."""
        for stage in self.stages[n_stages:]:
            x = stage(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.forward_until(x, len(self.stages)), len(self.stages))

    def forward_tapped(self, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`forward`, and the outputs of the stages ``taps`` (indices, in stage order) on the way."""
        x, tapped = self.stem(x), []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in taps:
                tapped.append(x)
        return self.head(x), tapped


PREPROCESS_KEYS = ("input_size", "mean", "std")  # required in a backbone entry's metadata
CONTRACT = "see thali_register_backbones in thali.core.hookspecs"


def as_feature_backbone(module: Any, name: str, who: str, metadata: Mapping[str, Any]) -> FeatureBackbone:
    """What a backbone factory returned, as a :class:`FeatureBackbone`.

    The hookspec promises that any ``torch.nn.Module`` with ``num_features`` mapping ``(N, 3, H, W)`` to
    ``(N, num_features, h, w)`` is a backbone: such a plain module becomes a backbone of *one stage*
    (no stem, no head), with the preprocessing taken from the entry's metadata. Anything else is one
    :class:`PluginError` line naming the component and its plugin (``who``)."""
    if isinstance(module, FeatureBackbone):
        return module
    if not isinstance(module, nn.Module):
        raise PluginError(
            f"backbone {name!r} ({who}) returned {type(module).__name__}, not a torch.nn.Module; {CONTRACT}"
        )
    channels = getattr(module, "num_features", None)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise PluginError(
            f"backbone {name!r} ({who}) returned a {type(module).__name__} without an integer "
            f"num_features (the channel count C of its (N, C, h, w) feature maps); {CONTRACT}"
        )
    missing = [k for k in PREPROCESS_KEYS if k not in metadata]
    if missing:
        raise PluginError(
            f"backbone {name!r} ({who}): its registry metadata lacks {', '.join(missing)} (the "
            f"preprocessing its weights expect, carried into the model package); {CONTRACT}"
        )
    try:
        c, h, w = (int(v) for v in metadata["input_size"])
        mean = tuple(float(v) for v in metadata["mean"])
        std = tuple(float(v) for v in metadata["std"])
        preprocess: dict[str, Any] = {
            "input_size": (c, h, w),
            "mean": mean,
            "std": std,
            "interpolation": str(metadata.get("interpolation", "bilinear")),
            "crop_pct": float(metadata.get("crop_pct", DEFAULT_CROP_PCT)),
        }
    except (TypeError, ValueError) as exc:
        raise PluginError(f"backbone {name!r} ({who}): unusable preprocessing metadata ({exc})") from None
    if c != 3 or len(mean) != 3 or len(std) != 3:
        raise PluginError(f"backbone {name!r} ({who}): input_size, mean and std must be for 3 channels (RGB)")
    try:
        interpolation_flag(preprocess["interpolation"])
    except DataError as exc:
        raise PluginError(f"backbone {name!r} ({who}): {exc}") from None
    return FeatureBackbone(
        nn.Identity(),
        [module],
        nn.Identity(),
        num_features=channels,
        stage_channels=[channels],
        preprocess=preprocess,
    )


def check_output(backbone: FeatureBackbone, name: str, who: str) -> None:
    """One small forward pass: the feature maps must be ``(N, num_features, h, w)``."""
    size = min(64, int(backbone.preprocess.get("input_size", (3, 64, 64))[-1]))
    x = torch.zeros(2, 3, size, size)
    mode = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(x)
    except Exception as exc:
        raise PluginError(
            f"backbone {name!r} ({who}) failed on a (2, 3, {size}, {size}) batch: {one_line(exc, 200)}"
        ) from exc
    finally:
        backbone.train(mode)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if shape is None or len(shape) != 4 or shape[:2] != (2, backbone.num_features):
        got = shape if shape is not None else type(out).__name__
        raise PluginError(
            f"backbone {name!r} ({who}) returned {got} from (2, 3, {size}, {size}) images; a backbone must "
            f"return 4-D feature maps (N, num_features={backbone.num_features}, h, w)"
        )


def probe_channels(stem: nn.Module, stages: Sequence[nn.Module], size: int = 64) -> list[int]:
    """Channel count after each stage, found with one small forward pass."""
    modules = [stem, *stages]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()  # keep BatchNorm running statistics untouched
    try:
        with torch.no_grad():
            x = stem(torch.zeros(1, 3, size, size))
            out = []
            for stage in stages:
                x = stage(x)
                out.append(int(x.shape[1]))
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return out


def _read_state(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {path}: no such checkpoint file{hint}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_checkpoint(path: Path, *candidates: nn.Module, hint: str = "") -> None:
    """Load a local checkpoint into the first candidate module whose weights it holds in full.

    Accepts timm state dicts and thali checkpoints (``FeatureBackbone`` keys, optionally under
    ``model`` / ``backbone.``); head and classifier weights of other tasks are ignored.
    """
    state = _read_state(path, f" ({hint})" if hint else "")
    best_missing: list[str] = []
    for module in candidates:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        if not missing:
            module.load_state_dict({k: state[k] for k in own}, strict=True)
            return
        if not best_missing or len(missing) < len(best_missing):
            best_missing = missing
    raise ConfigError(
        f"model.pretrained: {path} does not fit this backbone: {len(best_missing)} weights missing "
        f"(first: {', '.join(best_missing[:3])})"
    )
