"""The unknown flag's feature scores (k-NN in the training span, and the residual outside it): fitted,
thresholded on held-out photos, shipped in ``calibration.json`` (checked like every untrusted input),
chosen on out-of-domain photos at export."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from thali.core.errors import ConfigError, DataError
from thali.core.inference.unknown import METHOD, choose_threshold, choose_thresholds, encode, fit, load_spec


def _clusters(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([c + rng.normal(0, 0.3, (n, centres.shape[1])) for c in centres])


def test_feature_scores_flag_what_is_far_from_training_and_survive_the_trip_through_json() -> None:
    rng = np.random.default_rng(0)
    centres = np.abs(rng.normal(0, 1, (4, 48)))  # penultimate features are mostly non-negative
    score = fit(_clusters(rng, centres, 60), k=3, dims=8)
    held_out = score.components(_clusters(rng, centres, 25))  # our classes, photos not trained on
    near = score.components(_clusters(rng, 0.5 * centres[:2] + 0.5 * centres[2:], 20))  # mixtures: k-NN
    away = score.components(np.abs(rng.normal(0, 1, (20, 48))) * 3)  # other directions: residual
    t_knn, t_res = choose_thresholds(held_out, 0.05, [near, away])
    fitted = dataclasses.replace(score, knn_threshold=t_knn, residual_threshold=t_res)
    flagged = fitted.scores(_clusters(np.random.default_rng(1), centres, 25)) < 0
    assert flagged.mean() <= 0.12  # fresh photos of our classes: about the 5 % the threshold allows
    assert (fitted.scores(np.abs(rng.normal(0, 1, (40, 48))) * 3) < 0).mean() >= 0.95
    assert ((held_out[0] < t_knn) | (held_out[1] < t_res)).mean() <= 0.05

    loaded = load_spec(json.loads(json.dumps({"temperature": 1.0, "unknown": fitted.to_spec()})))
    assert loaded is not None and loaded.bank.shape == (240, 8) and loaded.threshold == 0.0
    same = _clusters(np.random.default_rng(9), centres, 3)
    np.testing.assert_allclose(loaded.scores(same), fitted.scores(same), atol=1e-6)
    assert load_spec({"temperature": 1.0}) is None  # a package without one: the top-probability flag


def test_the_two_thresholds_never_flag_more_than_the_budget_together() -> None:
    rng = np.random.default_rng(3)
    in_domain = (rng.normal(0, 1, 400), rng.normal(0, 1, 400))
    only_residual_catches = (rng.normal(0, 1, 50), rng.normal(-4, 0.5, 50))
    for outside in ([], [only_residual_catches]):
        t_knn, t_res = choose_thresholds(in_domain, 0.05, outside)
        assert ((in_domain[0] < t_knn) | (in_domain[1] < t_res)).mean() <= 0.05
    assert t_knn <= np.sort(in_domain[0])[2]  # the budget went to the score that catches them
    assert (only_residual_catches[1] < t_res).mean() == 1.0


def test_choose_threshold_never_flags_more_than_allowed() -> None:
    values = np.arange(100, dtype=float)
    for share in (0.0, 0.05, 0.5, 0.99):
        threshold = choose_threshold(values, share)
        assert (values < threshold).mean() <= share
        assert (values < threshold + 1).mean() > share or threshold > values.max()  # and not fewer


def _spec() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    fitted = fit(rng.normal(0, 1, (30, 12)), k=2, dims=4)
    return dataclasses.replace(fitted, knn_threshold=0.1, residual_threshold=-0.5).to_spec()


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
    "projection too wide": (_set("projection", encode(np.zeros((20_000, 4)))), "do not fit together"),
    "not base64": (_set("bank.base64", "!" * len(_spec()["bank"]["base64"])), "not valid base64"),
    "other dtype": (_set("bank.dtype", "object"), "dtype: float16"),
    "not finite": (_set("projection", encode(np.full((12, 4), np.nan))), "not finite"),
    "shapes do not fit": (_set("bank", encode(np.zeros((30, 3)))), "do not fit together"),
    "unknown method": (_set("method", "pickle"), f"not one of: {METHOD}"),
    "k a boolean": (_set("k", True), "unknown.k"),
    "k huge": (_set("k", 10**9), "unknown.k"),
    "threshold text": (_set("knn_threshold", "0.5"), "unknown.knn_threshold"),
    "threshold infinite": (_set("residual_threshold", float("inf")), "unknown.residual_threshold"),
    "threshold missing": (_set("residual_threshold", None), "unknown.residual_threshold"),
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
    assert score is not None and report["method"] == METHOD
    assert report["in_domain"] == "validation split"  # a random split: no held-out collections
    shipped = report["scores"][METHOD]
    assert shipped["knn_threshold"] == pytest.approx(score.knn_threshold)
    assert shipped["residual_threshold"] == pytest.approx(score.residual_threshold)
    assert shipped["flagged"]["in-domain held out"] <= 0.05
    assert set(shipped["flagged_by_variant"]) == {"int8"}  # the served variant's features, measured too
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

    _patterns(tiny_data.parent / "ood_patterns", 12)  # half choose, half measure
    out = tmp_path / "export"
    overrides = ["export.variants=[fp32]", "export.unknown.ood=[ood_patterns]"]
    report = export_run(tiny_run, registries, out_dir=out, overrides=overrides, progress=False)["unknown"]
    assert report["ood_images"] == {"ood_patterns": 12}
    flagged = {m: s["flagged"]["ood_patterns"] for m, s in report["scores"].items()}
    assert set(flagged) == {METHOD, "max_probability"} and "other half" in report["ood_protocol"]
    assert flagged[METHOD] >= 5 / 6  # stripes and boards: nothing like three colours
    assert all(s["flagged"]["in-domain held out"] <= 0.05 for s in report["scores"].values())
    calibration = json.loads((out / "calibration.json").read_text())
    assert ("unknown" in calibration) == (report["method"] == METHOD)

    with pytest.raises(ConfigError, match=r"export\.unknown\.ood"):  # a path, not a name beside the data
        export_run(tiny_run, registries, out_dir=tmp_path / "e2", overrides=["export.unknown.ood=[../etc]"])
    # a folder the domain names but this machine lacks: measured without it, and said so
    elsewhere = export_run(
        tiny_run, registries, out_dir=tmp_path / "e3", overrides=["export.unknown.ood=[nowhere]"]
    )
    assert "no folder nowhere beside the data folder" in elsewhere["unknown"]["warning"]
    assert elsewhere["unknown"]["ood_images"] == {}
