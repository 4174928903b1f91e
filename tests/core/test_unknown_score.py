"""The unknown flag's k-NN feature score: fitted, thresholded on held-out photos, shipped in
``calibration.json`` (checked like every untrusted input), chosen on out-of-domain photos at export."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from thali.core.errors import ConfigError, DataError
from thali.core.inference.unknown import choose_threshold, encode, fit, load_spec


def _clusters(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([c + rng.normal(0, 0.3, (n, centres.shape[1])) for c in centres])


def test_knn_score_flags_what_is_far_from_training_and_survives_the_trip_through_json() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 48))
    score = fit(_clusters(rng, centres, 60), k=3, dims=16)
    held_out = score.scores(_clusters(rng, centres, 25))  # our classes, photos not trained on
    outside = score.scores(rng.normal(0, 1, (40, 48)) + 3 * rng.normal(0, 1, 48))  # somewhere else
    threshold = choose_threshold(held_out, 0.05)
    assert (held_out < threshold).mean() <= 0.05
    assert (outside < threshold).mean() >= 0.95
    shipped = dataclasses.replace(score, threshold=threshold).to_spec()
    loaded = load_spec(json.loads(json.dumps({"temperature": 1.0, "unknown": shipped})))
    assert loaded is not None and loaded.threshold == threshold and loaded.bank.shape == (240, 16)
    same = _clusters(np.random.default_rng(9), centres, 3)
    np.testing.assert_allclose(loaded.scores(same), score.scores(same), atol=1e-6)
    assert load_spec({"temperature": 1.0}) is None  # a package without one: the top-probability flag


def test_choose_threshold_never_flags_more_than_allowed() -> None:
    values = np.arange(100, dtype=float)
    for share in (0.0, 0.05, 0.5, 0.99):
        threshold = choose_threshold(values, share)
        assert (values < threshold).mean() <= share
        assert (values < threshold + 1).mean() > share or threshold > values.max()  # and not fewer


def _spec() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return dataclasses.replace(fit(rng.normal(0, 1, (30, 12)), k=2, dims=4), threshold=0.1).to_spec()


def _set(path: str, value: Any) -> Any:
    def mutate(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = spec
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


ATTACKS = {
    # a claimed shape far larger than the data: refused before anything is decoded or allocated
    "bank shape bomb": (_set("bank.shape", [4000, 4000]), "does not match the size"),
    "bank shape not numbers": (_set("bank.shape", ["1", 2]), "positive whole numbers"),
    "bank one dimension": (_set("bank.shape", [120]), "positive whole numbers"),
    "not base64": (_set("bank.base64", "!" * len(_spec()["bank"]["base64"])), "not valid base64"),
    "other dtype": (_set("bank.dtype", "object"), "dtype: float16"),
    "not finite": (_set("mean", encode(np.full(12, np.nan))), "not finite"),
    "shapes do not fit": (_set("mean", encode(np.zeros(7))), "do not fit together"),
    "unknown method": (_set("method", "pickle"), "not one of: knn_cosine"),
    "k a boolean": (_set("k", True), "unknown.k"),
    "k huge": (_set("k", 10**9), "unknown.k"),
    "threshold text": (_set("threshold", "0.5"), "unknown.threshold"),
    "threshold infinite": (_set("threshold", float("inf")), "unknown.threshold"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_malformed_or_hostile_score_is_refused_with_a_clear_error(attack: str) -> None:
    mutate, message = ATTACKS[attack]
    spec = copy.deepcopy(_spec())
    mutate(spec)
    with pytest.raises(DataError, match=message) as caught:
        load_spec({"temperature": 1.0, "unknown": spec})
    assert "calibration.json unknown" in str(caught.value)
    with pytest.raises(DataError, match="expected an object"):
        load_spec({"unknown": ["not", "a", "spec"]})


def test_every_export_ships_features_and_the_score_chosen_on_held_out_photos(tiny_export: Path) -> None:
    import onnxruntime as ort

    calibration = json.loads((tiny_export / "calibration.json").read_text())
    report = json.loads((tiny_export / "export.json").read_text())["unknown"]
    score = load_spec(calibration)
    assert score is not None and report["method"] == "knn_cosine"
    assert report["in_domain"] == "validation split"  # a random split: no held-out collections
    knn = report["scores"]["knn_cosine"]
    assert knn["threshold"] == pytest.approx(score.threshold)
    assert knn["flagged"]["in-domain held out"] <= 0.05
    assert report["scores"]["max_probability"]["threshold"] == pytest.approx(calibration["unknown_threshold"])
    for variant in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(tiny_export / variant), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        assert names[:2] == ["logits", "features"], names
        features = session.run(["features"], {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
        assert features.shape == (2, score.dims)


def _patterns(folder: Path, count: int) -> None:
    """Black-and-white stripes and checkerboards: nothing like the tiny domain's colour photos."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        y, x = np.mgrid[0:36, 0:44]
        cell = 2 + i % 5
        board = ((x // cell + (y // cell) * (i % 2)) % 2 * 255).astype(np.uint8)
        Image.fromarray(np.stack([board] * 3, axis=-1)).save(folder / f"pattern_{i:02d}.png")


def test_export_reports_out_of_domain_photos_and_picks_the_score_that_flags_more(
    tiny_run: Path, tiny_data: Path, registries: Any, tmp_path: Path
) -> None:
    from thali.core.exporting.pipeline import export_run

    _patterns(tiny_data.parent / "ood_patterns", 12)
    out = tmp_path / "export"
    overrides = ["export.variants=[fp32]", "export.unknown.ood=[ood_patterns]"]
    report = export_run(tiny_run, registries, out_dir=out, overrides=overrides, progress=False)["unknown"]
    assert report["ood_images"] == {"ood_patterns": 12}
    flagged = {m: s["flagged"]["ood_patterns"] for m, s in report["scores"].items()}
    assert report["method"] == max(flagged, key=lambda m: (flagged[m], m == "knn_cosine"))
    assert all(s["flagged"]["in-domain held out"] <= 0.05 for s in report["scores"].values())
    calibration = json.loads((out / "calibration.json").read_text())
    assert ("unknown" in calibration) == (report["method"] == "knn_cosine")

    with pytest.raises(ConfigError, match=r"export\.unknown\.ood"):  # a path, not a name beside the data
        export_run(tiny_run, registries, out_dir=tmp_path / "e2", overrides=["export.unknown.ood=[../etc]"])
    with pytest.raises(DataError, match="not a folder of photos"):
        export_run(tiny_run, registries, out_dir=tmp_path / "e3", overrides=["export.unknown.ood=[nowhere]"])
