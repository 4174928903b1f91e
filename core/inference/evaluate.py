"""``thali evaluate DOMAIN[@REF]``: score a registry model on an ImageFolder directory through a serving
backend and the serving preprocessing, with the metrics a training run is scored with. No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from thali.core.errors import DataError, PluginError
from thali.core.export import LOGITS
from thali.core.images import ImageLimits, decode_rgb
from thali.core.manifest import Manifest, ModelPackage
from thali.core.registry import Registries

from .backend import load_backend
from .preprocess import Preprocessor


def image_limits(manifest: Manifest) -> ImageLimits:
    """The image caps of the config the package was trained with."""
    caps = manifest.image_caps
    return ImageLimits(max_pixels=caps.max_pixels, max_bytes=caps.max_bytes)


def evaluate_package(
    package: ModelPackage,
    data_dir: Path,
    registries: Registries,
    *,
    backend: str = "onnxruntime",
    variant: str = "fp32",
    batch_size: int = 32,
    progress: bool = True,
    **backend_params: Any,
) -> dict[str, Any]:
    """Score ``package`` (a verified :class:`thali.registry.ModelPackage`) on the ImageFolder ``data_dir``,
    whose folder names are classes of the package; unreadable images are skipped and reported."""
    from tqdm import tqdm

    from thali.core.metrics import summarize
    from thali.core.samples import report_problems, scoring_samples, verify_images

    data_dir = Path(data_dir)
    classes = package.class_names
    samples = scoring_samples(registries, data_dir, classes, package.domain)
    limits = image_limits(package.manifest)
    samples, problems = verify_images(samples, progress=progress, limits=limits)
    engine = load_backend(
        registries,
        backend,
        package.model_path(variant),
        variant=variant,
        package=package,
        registries=registries,
        **backend_params,
    )
    preprocess = Preprocessor(package.preprocess, limits)
    logits: list[np.ndarray] = []
    labels: list[int] = []
    batches = range(0, len(samples), batch_size)
    for start in tqdm(batches, desc="evaluating", unit="batch", disable=not progress, leave=False):
        inputs = []
        for path, label in samples[start : start + batch_size]:
            try:
                inputs.append(preprocess(decode_rgb(path, limits)))
                labels.append(label)
            except DataError as exc:
                problems.append((path, exc.message))
            except Exception as exc:  # any decoder error means: skip this file
                problems.append((path, f"{type(exc).__name__}: {exc}"))
        if inputs:
            logits.append(np.asarray(engine.run(np.stack(inputs), frozenset())[LOGITS], dtype=np.float32))
    if not logits:
        raise DataError(f"{data_dir}: no readable images")
    scores = np.concatenate(logits)
    if scores.shape != (len(labels), len(classes)):
        raise PluginError(
            f"serving backend {backend!r} returned logits of shape {scores.shape}, "
            f"expected ({len(labels)}, {len(classes)})"
        )
    temperature = float(package.calibration.get("temperature") or 1.0)
    result = summarize(scores, np.asarray(labels), classes, temperature)
    result["skipped"] = len(problems)
    if message := report_problems(problems):
        result["problems"] = message
    info = engine.info()
    result["data"] = str(data_dir)
    result["model"] = f"{package.domain}@{package.version}"
    result.update(domain=package.domain, version=package.version, variant=variant)
    result.update(backend=info.get("backend", backend), provider=info.get("provider"))
    return result
