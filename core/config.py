"""The domain-pack config (``domain.yaml``): pydantic schemas, YAML loading, ``--set`` overrides.

Every model forbids unknown fields, so a typo is an error that names the field instead of a setting that
is silently ignored. :func:`load_config` reports a bad file as ``FILE:LINE: field.path: what was expected``.
Component names (dataset, backbone, attention, loss) are plain strings here; :func:`check_components`
looks them up in the plugin registries.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .errors import ConfigError, UnknownComponentError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from .names import check_name
from .registry import Registries
from .safe_yaml import parse_yaml, read_yaml

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


class Strict(BaseModel):
    """Base of every config model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="class id, lowercase snake_case")
    display_name: str | None = Field(None, description="what people see; defaults to a title-cased name")
    description: str = ""

    @model_validator(mode="after")
    def _default_display(self) -> ClassSpec:
        if self.display_name is None:
            self.display_name = self.name.replace("_", " ").title()
        return self


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regular expression {pattern!r} does not compile: {exc}") from None
    return pattern


STYLE_NAME = r"^[A-Za-z0-9_-]{1,32}$"


class StyleConfig(Strict):
    """Sub-collections inside a group, told apart by a regex on one manifest column's file name."""

    column: str = Field(
        min_length=1, description="manifest column whose value's base name (after the last /) is matched"
    )
    patterns: dict[Annotated[str, Field(pattern=STYLE_NAME)], Annotated[str, AfterValidator(_compiles)]] = (
        Field(
            min_length=1,
            description="sub-collection name -> regex (re.search on the base name); the group key gets "
            "'#NAME' of the first that matches, '#other' when none does",
        )
    )
    groups: list[str] = Field(
        default_factory=list, description="only these group keys are divided by style (empty: every group)"
    )


def _relative_inside(value: str) -> str:
    """A relative path that cannot leave the folder it is joined to (checked again on disk)."""
    parts = value.replace("\\", "/").split("/")
    if not value.strip() or "\x00" in value:
        raise ValueError("expected a relative path inside the data folder")
    if value.startswith(("/", "\\", "~")) or (len(value) > 1 and value[1] == ":"):
        raise ValueError(f"{value!r} is not a relative path inside the data folder")
    if ".." in parts:
        raise ValueError(f"{value!r} leaves the data folder ('..' is not allowed)")
    return value


class GroupConfig(Strict):
    """Cross-collection validation: which photo collection each image comes from, read from a CSV
    manifest in the data folder. Per class, one whole collection is held out as validation."""

    manifest: str = Field(
        "manifest.csv", description="CSV inside the data folder (relative path, never outside it)"
    )
    file_column: str = Field(
        "file", min_length=1, description="column with each image's path relative to the data folder"
    )
    columns: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["source_repo"],
        min_length=1,
        description="the group key: these columns' values, joined with '|'",
    )
    styles: StyleConfig | None = Field(
        None, description="optional: sub-collections inside a group, by a regex on a column"
    )
    min_images: int = Field(
        10, ge=1, description="a group with fewer images of a class is never that class's validation group"
    )
    exclude_from_training: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="collections (a group, or a source before '#') whose photos never train; the split "
        "is made as without this, so validation stays the same: a baseline without new collections",
    )

    @field_validator("manifest")
    @classmethod
    def _inside(cls, v: str) -> str:
        return _relative_inside(v)

    @field_validator("columns")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a column is listed twice")
        return v


class SplitConfig(Strict):
    val: float = Field(0.15, ge=0.0, lt=1.0)
    test: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 42
    group: GroupConfig | None = Field(
        None,
        description="hold out whole photo collections per class (from a provenance manifest); "
        "unset: a random stratified split",
    )

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must leave some images for training (sum < 1)")
        return self


class DatasetConfig(Strict):
    name: str = Field("imagefolder", description="dataset reader (registry name)")
    path: str | None = Field(None, description="data folder or manifest; else --data or $THALI_DATA")
    licence: str = Field("", description="the data's licence or terms; copied into every model card")
    split: SplitConfig = Field(default_factory=SplitConfig)
    params: dict[str, Any] = Field(default_factory=dict)
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="an image with more pixels is skipped unread (bombs)"
    )
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="a larger image file is skipped unread")

    def image_limits(self) -> ImageLimits:
        """The caps every image of this dataset is checked against before decoding."""
        return ImageLimits(max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes)


class AttentionPlacement(Strict):
    name: str = Field(description="attention module (registry name)")
    where: Literal["head", "stages"] = Field(
        "head", description="'head': last feature map before pooling; 'stages': after chosen stages"
    )
    stages: list[int] = Field(default_factory=list, description="stage indices when where=stages")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _stages(self) -> AttentionPlacement:
        if self.where == "stages" and not self.stages:
            raise ValueError("where: stages needs a non-empty 'stages' list")
        if self.where == "head" and self.stages:
            raise ValueError("'stages' is only used with where: stages")
        return self


class ModelConfig(Strict):
    backbone: str = Field("tf_efficientnet_lite0", description="backbone (registry name)")
    pretrained: str = Field(
        "none", description="'none', a weight source of the backbone, or a checkpoint path"
    )
    attention: list[AttentionPlacement] = Field(default_factory=list)
    head_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    params: dict[str, Any] = Field(default_factory=dict, description="extra backbone arguments")
    eval_crop_pct: float | None = Field(
        None,
        gt=0.5,
        le=1.0,
        description="share of the shorter side the centre crop keeps in validation, export and serving "
        "(1.0: the whole photo); default: the backbone's (0.875 for most)",
    )


class LossConfig(Strict):
    name: str = Field("cross_entropy", description="loss (registry name)")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    params: dict[str, Any] = Field(default_factory=dict)


class AugmentationConfig(Strict):
    random_resized_crop_scale: tuple[float, float] = (0.35, 1.0)
    horizontal_flip: float = Field(0.5, ge=0.0, le=1.0)
    vertical_flip: float = Field(0.0, ge=0.0, le=1.0)
    rotate_degrees: float = Field(15.0, ge=0.0, le=180.0)
    brightness_contrast: float = Field(0.2, ge=0.0, le=1.0)
    color_jitter: float = Field(0.1, ge=0.0, le=1.0)
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    mix_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Cross-collection robustness (other cameras, JPEG quality, light, plating); all off by default.
    # Hue: color_jitter already shifts hue by up to color_jitter / 4 of the hue circle, so no field here.
    jpeg_quality: tuple[int, int] | None = Field(
        None,
        description="[min, max] JPEG quality (1-100) an image is re-encoded at, with probability jpeg_prob; "
        "null: off",
    )
    jpeg_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="probability of the JPEG re-encoding (only used with jpeg_quality)"
    )
    blur: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="probability of one mild blur: Gaussian or motion (3-5 px kernel) or defocus "
        "(radius 1-3 px)",
    )
    noise: float = Field(
        0.0, ge=0.0, le=1.0, description="probability of mild Gaussian or camera (ISO) noise"
    )
    random_erasing: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="probability of erasing 1-3 rectangles (each 10-25% of height and width) to the mean "
        "colour, after normalisation",
    )

    @field_validator("random_resized_crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("expected [min, max] with 0 < min <= max <= 1")
        return v

    @field_validator("jpeg_quality")
    @classmethod
    def _jpeg_quality(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 1 <= v[0] <= v[1] <= 100:
            raise ValueError("expected [min, max] with 1 <= min <= max <= 100")
        return v


class OptimizerConfig(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)


class ScheduleConfig(Strict):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    step_epochs: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: float = Field(1e-6, ge=0.0)


class EarlyStoppingConfig(Strict):
    enabled: bool = True
    metric: Literal["val_top1", "val_loss"] = "val_top1"
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class EMAConfig(Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0.0, lt=1.0)


class TrainingConfig(Strict):
    mode: Literal["full", "partial", "frozen_features"] = Field(
        "partial",
        description="full fine-tuning; partial: train the last stages; frozen_features: cache features",
    )
    trainable_stages: int = Field(2, ge=0, description="partial/frozen_features: the last N stages train")
    cache_views: int = Field(4, ge=1, description="frozen_features: augmented views cached per image")
    feature_engine: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto", description="frozen_features: what runs the frozen part (auto: ONNX Runtime on CPU)"
    )
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = "auto"
    ema: EMAConfig = Field(default_factory=EMAConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    seed: int = 42
    num_workers: int = Field(2, ge=0)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    init_from: str | None = Field(
        None,
        description="a run folder of the same model whose best.pt the training starts from (LP-FT: "
        "fine-tune from a linear probe's head, not a random one)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_PATTERN.fullmatch(v):
            raise ValueError("expected 'auto', 'cpu', 'cuda', 'cuda:N' (N a GPU index) or 'mps'")
        return v


class GateConfig(Strict):
    """Accuracy gate of every variant against the fp32 model, on the validation split."""

    max_top1_drop: float = Field(1.0, ge=0.0, description="percentage points against fp32")
    max_class_drop: float = Field(5.0, ge=0.0, description="percentage points, any one class")
    class_noise_images: int = Field(
        1, ge=0, description="a class losing no more than this many images (net) never fails the gate"
    )


class UnknownConfig(Strict):
    """The unknown flag the export ships (see :mod:`thali.core.inference.unknown`)."""

    method: Literal["auto", "knn_residual", "max_probability"] = Field(
        "auto",
        description="auto: the score that flags more out-of-domain photos (knn_residual without any)",
    )
    max_in_domain_flagged: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of held-out photos of our own classes the threshold may flag"
    )
    budget: Literal["per_collection", "pooled"] = Field(
        "per_collection",
        description="per_collection: the share holds in every held-out collection of a cross-collection "
        "split (the worst unseen collection stays within it); pooled: over all held-out photos together",
    )
    ood: list[str] = Field(
        default_factory=list,
        description="out-of-domain photo folders beside the data folder (plain names, e.g. "
        "ood_other_cuisines): never trained on, used to choose the score and reported in the card",
    )
    k: int = Field(5, ge=1, le=100, description="the k-th nearest training photo gives the k-NN score")
    dims: int = Field(
        128, ge=8, le=2048, description="principal axes: the k-NN space; the rest is the residual score"
    )
    max_bank: int = Field(4096, ge=16, le=50_000, description="training photos kept in the bank at most")
    stages: Literal["auto"] | list[int] = Field(
        "auto",
        description="backbone stages (indices) whose pooled outputs the k-NN score also reads (the "
        "model's stage_features output); auto: the two before the last, for a backbone of 4 stages or "
        "more; [] for none",
    )

    layer_weight: Literal["auto"] | float = Field(
        "auto",
        description="each earlier stage's weight in the k-NN score, next to 1 for the last features; auto: "
        "the one of 0.25, 0.5, 0.75, 1, 1.5, 2 that flags most of the ood photos that choose (0.5 "
        "without any)",
    )

    @field_validator("layer_weight", mode="before")  # before: pydantic would read true as 1.0
    @classmethod
    def _weight(cls, v: Any) -> Any:
        if v != "auto" and (
            isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v <= 10 and math.isfinite(v))
        ):
            raise ValueError("auto, or a number above 0 and at most 10")
        return v

    @field_validator("stages")
    @classmethod
    def _few_stages(cls, v: Any) -> Any:
        if isinstance(v, list) and (len(v) > 8 or any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError("at most 8 different stage indices, each 0 or more")
        return v

    def stage_indices(self, n_stages: int) -> list[int]:
        """The stages the score reads for a backbone of ``n_stages`` stages; a clear error for one that
        does not exist."""
        if self.stages == "auto":
            return [n_stages - 3, n_stages - 2] if n_stages >= 4 else []
        missing = [i for i in self.stages if i >= n_stages]
        if missing:
            raise ConfigError(
                f"export.unknown.stages: stage {missing[0]} does not exist; the backbone has stages "
                f"0..{n_stages - 1}"
            )
        return sorted(self.stages)

    @field_validator("ood")
    @classmethod
    def _plain_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"{name!r}: a plain folder name beside the data folder, not a path")
        return v


class ExportConfig(Strict):
    opset: int = Field(18, ge=18)
    variants: list[str] = Field(
        default_factory=lambda: ["fp32", "int8", "fp16"],
        description="fp32 is always made; others are exporter names (int8, fp16, int8_dynamic, plugins')",
    )
    calibration_images: int = Field(256, ge=1)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    reduce_range: Literal["auto", True, False] = "auto"
    exclude_nodes: list[str] = Field(default_factory=list)
    gate: GateConfig = Field(default_factory=GateConfig)
    explain: bool = Field(
        False, description="also export a 'cam' output: class-activation maps (N, K, h, w) for heatmaps"
    )
    unknown: UnknownConfig = Field(default_factory=UnknownConfig)


class ServingConfig(Strict):
    backend: str = Field("onnxruntime", description="serving backend (registry name)")
    variant: Literal["fp32", "int8", "fp16"] = "int8"
    top_k: int = Field(5, ge=1)
    max_batch_size: int = Field(32, ge=1)
    batch_timeout_ms: float = Field(5.0, ge=0.0)


class DomainConfig(Strict):
    """A domain pack: what to recognise, from which data, with which model, and how to serve it."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64, description="also the registry's domain name")
    description: str = ""
    classes: list[ClassSpec] = Field(min_length=2)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[ClassSpec]) -> list[ClassSpec]:
        seen: set[str] = set()
        for c in v:
            if c.name in seen:
                raise ValueError(f"class {c.name!r} is listed twice")
            seen.add(c.name)
        return v

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


# --- YAML with line numbers -------------------------------------------------------------------


def _line_map(node: yaml.Node | None, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    lines: dict[tuple[Any, ...], int] = {}
    if node is None:
        return lines
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            lines.update(_line_map(value, sub))
            lines[sub] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, (*path, i)))
    return lines


def format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``training.epochs=3`` -> (["training", "epochs"], 3); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. training.epochs=3")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    value = parse_yaml(raw, f"--set {key.strip()}")[0] if raw.strip() else ""
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[tuple[Any, ...]]:
    """Apply ``--set`` overrides to raw config data in place; return the paths they touched."""
    touched: set[tuple[Any, ...]] = set()
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise ConfigError(f"--set {text!r}: {format_path(tuple(path[: i + 1]))} is no item")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {text!r}: {format_path(tuple(path[:i]))} is no section")
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise ConfigError(f"--set {text!r}: {format_path(tuple(path))} is no item")
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {format_path(tuple(path[:-1]))} is no section")
        touched.add(tuple(path))
    return touched


def _describe(err: ErrorDetails) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown field (not part of the schema; check the spelling)"
    if err["type"] == "missing":
        return "required field is missing"
    value = err.get("input")
    if value is not None and not isinstance(value, dict | list):
        return f"{msg} (got {value!r})"
    return msg


def validation_to_config_error(
    exc: ValidationError,
    source: str,
    lines: dict[tuple[Any, ...], int] | None = None,
    overridden: set[tuple[Any, ...]] | None = None,
) -> ConfigError:
    lines, overridden = lines or {}, overridden or set()
    problems, fields = [], {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = format_path(loc)
        origin = " (from --set)" if any(loc[: len(p)] == p for p in overridden) else ""
        line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
        prefix = f"{source}:{line}" if line and not origin else source  # no file line for a --set
        text = _describe(err)
        problems.append(f"{prefix}: {where}: {text}{origin}")
        fields[where] = text
    head = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    detail = "\n".join("  " + p for p in problems[1:])
    return ConfigError(head + ("\n" + detail if detail else ""), errors=fields)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; nested mappings merge, everything else is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_mapping(
    path: Path, expected: str = "expected a mapping of fields at the top level"
) -> dict[str, Any]:
    """The YAML mapping in ``path``, unvalidated and within the YAML limits; else a ConfigError."""
    data = read_yaml(path)[0] or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {expected}")
    return data


def load_config(
    path: str | Path, overrides: list[str] | None = None, presets: list[Path] | None = None
) -> DomainConfig:
    """Read and validate a ``domain.yaml``: presets merge over it, then ``--set KEY=VALUE``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    data, node = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level")
    for preset in presets or []:
        data = deep_merge(data, read_mapping(preset, "a preset is a mapping of config fields"))
    source = str(path) + "".join(f" + {p.name}" for p in presets or [])
    overridden = apply_overrides(data, list(overrides or []))
    try:
        return DomainConfig.model_validate(data)
    except ValidationError as exc:
        lines = _line_map(node) if not presets else {}  # line numbers only mean something unmerged
        raise validation_to_config_error(exc, source, lines, overridden) from None


def check_components(config: DomainConfig, registries: Registries) -> None:
    """Check that every component the config names is registered; the error names the field."""
    refs: list[tuple[str, str, str]] = [
        ("dataset.name", "datasets", config.dataset.name),
        ("model.backbone", "backbones", config.model.backbone),
        ("loss.name", "losses", config.loss.name),
    ]
    for i, placement in enumerate(config.model.attention):
        refs.append((f"model.attention[{i}].name", "attention", placement.name))
    for i, variant in enumerate(config.export.variants):
        if variant != "fp32":
            check_name(variant, f"export.variants[{i}]")  # it becomes a file name in every package
            refs.append((f"export.variants[{i}]", "exporters", variant))
    for field_path, kind, name in refs:
        registry = registries.of(kind)
        if name not in registry:
            err: UnknownComponentError = registry.unknown(name)
            raise ConfigError(f"{config.name}: {field_path}: {err.message}", errors={field_path: err.message})
