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


def _layered(seed: int = 0, n: int = 60) -> tuple[Any, Any]:
    """Training photos of 4 classes and out-of-domain photos whose last features look like ours (the
    classifier learned to ignore what differs) while an earlier stage sees them differ."""
    rng = np.random.default_rng(seed)
    last = np.abs(rng.normal(0, 1, (4, 48)))
    early = np.abs(rng.normal(0, 1, (4, 24)))
    odd = np.abs(rng.normal(0, 1, (4, 24)))  # their textures: another direction at the earlier stage

    def photos(early_centres: np.ndarray, count: int, r: np.random.Generator) -> tuple[Any, Any]:
        f = _clusters(r, last, count)
        s = _clusters(r, early_centres, count)
        return f, np.concatenate([s, s[:, :8] * 0.5], axis=1)  # two groups: stage 2 (24), stage 3 (8)

    train = photos(early, n, rng)
    return train, (
        photos(early, 25, np.random.default_rng(seed + 1)),
        photos(odd, 25, np.random.default_rng(seed + 2)),
    )


def test_earlier_stages_catch_what_the_last_features_cannot_and_travel_in_the_spec() -> None:
    (train_f, train_s), ((ours_f, ours_s), (odd_f, odd_s)) = _layered()
    flat = fit(train_f, k=3, dims=8)
    layered = fit(train_f, k=3, dims=8, stage_features=train_s, stages=[(2, 24), (3, 8)])
    assert [(layer.stage, layer.start, layer.stop) for layer in layered.layers] == [(2, 0, 24), (3, 24, 32)]
    assert len(layered.layers[0].bank) == len(layered.bank)  # the same training photos in every bank
    rates = {}
    for name, score, args in (("flat", flat, ()), ("layered", layered, None)):
        ours = score.components(ours_f, *(args if args is not None else (ours_s,)))
        odd = score.components(odd_f, *(args if args is not None else (odd_s,)))
        t = choose_threshold(ours[0], 0.05)
        rates[name] = ((ours[0] < t).mean(), (odd[0] < t).mean())
    assert rates["flat"][1] <= 0.3  # the last features alone cannot tell them apart
    assert rates["layered"][1] >= 0.9 and rates["layered"][0] <= 0.05

    # the layered k-NN score stays on the last features' scale (mean + std * z): thresholds read alike
    assert abs(float(np.median(layered.components(ours_f, ours_s)[0])) - layered.mean) < 3 * layered.std
    fitted = dataclasses.replace(layered, knn_threshold=0.5, residual_threshold=-0.5)
    loaded = load_spec(json.loads(json.dumps({"unknown": fitted.to_spec()})))
    assert loaded is not None and [layer.stage for layer in loaded.layers] == [2, 3]
    np.testing.assert_allclose(loaded.scores(odd_f, odd_s), fitted.scores(odd_f, odd_s), atol=1e-5)
    with pytest.raises(DataError, match="reads stage_features; the model gives none"):
        loaded.scores(odd_f)
    with pytest.raises(DataError, match="stage_features have 31 values; the unknown score expects 32"):
        loaded.scores(odd_f, odd_s[:, :31])


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


def _layered_spec() -> dict[str, Any]:
    rng = np.random.default_rng(2)
    fitted = fit(
        rng.normal(0, 1, (30, 12)),
        k=2,
        dims=4,
        stage_features=rng.normal(0, 1, (30, 10)),
        stages=[(1, 6), (2, 4)],
    )
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
    "int8 bank without scales": (_set("bank.scales", None), "one float16 scale per row"),
    "int8 bank short scales": (_set("bank.scales", "AAAA"), "one float16 scale per row"),
    "int8 scales not base64": (_set("bank.scales", "!" * len(_spec()["bank"]["scales"])), "not valid base64"),
}
LAYER_ATTACKS = {
    "layers not a list": (_set("layers", {"0": 1}), "unknown.layers: expected a list"),
    "too many layers": (
        lambda s: s.update(layers=s["layers"] * 5),
        "unknown.layers: expected a list of 1 to 8",
    ),
    "layer not an object": (lambda s: s["layers"].__setitem__(0, "x"), r"layers\[0\]: expected an object"),
    "columns overlap": (lambda s: s["layers"][1].update(start=0), r"layers\[1\].start: expected 6"),
    "start a float": (lambda s: s["layers"][0].update(start=0.0), r"layers\[0\].start: expected 0"),
    "stage negative": (lambda s: s["layers"][0].update(stage=-1), r"layers\[0\].stage"),
    "bank other photos": (
        lambda s: s["layers"][0].update(bank=encode(np.ones((7, 4)))),
        "do not fit together",
    ),
    "bank shape lie": (lambda s: s["layers"][1]["bank"].update(shape=[3000, 2000]), "does not match"),
    # within one array's limit, but with what the spec holds already more than a spec may: refused
    # before anything of it is decoded
    "bank shape bomb": (lambda s: s["layers"][1]["bank"].update(shape=[4000, 4000]), "more than 16,000,000"),
    "spread zero": (lambda s: s["layers"][0].update(std=0), r"layers\[0\].std: expected a number above 0"),
    "weight text": (lambda s: s["layers"][1].update(weight="1"), r"layers\[1\].weight: expected a finite"),
    # weights that sum to 0 with the last features' 1 would divide by zero: every score NaN, none flagged
    "weight negative": (
        lambda s: s["layers"][0].update(weight=-1.0),
        r"layers\[0\].weight: expected a number above",
    ),
    "weight zero": (
        lambda s: s["layers"][1].update(weight=0),
        r"layers\[1\].weight: expected a number above 0",
    ),
    "mean missing": (lambda s: s.pop("mean"), "unknown.mean: expected a finite number"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS) + [f"layers: {a}" for a in sorted(LAYER_ATTACKS)])
def test_a_malformed_or_hostile_score_is_refused_with_a_clear_error(attack: str) -> None:
    layers = attack.startswith("layers: ")
    mutate, message = LAYER_ATTACKS[attack[8:]] if layers else ATTACKS[attack]
    spec = copy.deepcopy(_layered_spec() if layers else _spec())
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
        assert names[:3] == ["logits", "features", "stage_features"], names
        features, stages = session.run(names[1:3], {"input": np.zeros((2, 3, 32, 32), np.float32)})
        assert features.shape == (2, score.dims) and stages.shape == (2, score.stage_dims)
    # export.unknown.stages=[0, 1] (the session's export): the score reads both, the report says so
    assert [layer.stage for layer in score.layers] == report["stages"] == [0, 1]
    widths = json.loads((tiny_export / "export.json").read_text())["steps"]["onnx"]["stage_features"]
    assert [layer.stop - layer.start for layer in score.layers] == [w for _, w in widths]


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
    with pytest.raises(
        ConfigError, match=r"export\.unknown\.stages: stage 3 does not exist; .* stages 0\.\.2"
    ):
        export_run(tiny_run, registries, out_dir=tmp_path / "e4", overrides=["export.unknown.stages=[1, 3]"])
    assert elsewhere["unknown"]["ood_images"] == {}


def test_export_chooses_the_earlier_stages_weight_on_the_choosing_half(
    tiny_run: Path, tiny_data: Path, registries: Any, tmp_path: Path
) -> None:
    from thali.core.exporting.pipeline import export_run
    from thali.core.inference.unknown import LAYER_WEIGHTS

    _patterns(tiny_data.parent / "ood_patterns", 12)
    base = ["export.variants=[fp32]", "export.unknown.ood=[ood_patterns]", "export.unknown.stages=[0, 1]"]
    export = export_run(tiny_run, registries, out_dir=tmp_path / "auto", overrides=base, progress=False)
    report = export["unknown"]
    tried = report["layer_weights_tried"]  # layer_weight: auto (the default) with out-of-domain photos
    assert [float(w) for w in tried] == [0.5, *(w for w in LAYER_WEIGHTS if w != 0.5)]  # the default first
    assert all(0 <= share <= 1 for share in tried.values())
    chosen = f"{report['layer_weight']:g}"
    assert tried[chosen] == max(tried.values())  # the weight that flags most of them ships ...
    assert chosen == next(w for w, share in tried.items() if share == tried[chosen])  # (the first of a tie)
    score = load_spec(json.loads((tmp_path / "auto" / "calibration.json").read_text()))
    assert score is not None and {layer.weight for layer in score.layers} == {report["layer_weight"]}
    assert report["scores"][METHOD]["flagged"]["in-domain held out"] <= 0.05  # ... within the budget

    fixed = export_run(
        tiny_run, registries, out_dir=tmp_path / "fixed", overrides=[*base, "export.unknown.layer_weight=1.5"]
    )["unknown"]
    assert fixed["layer_weight"] == 1.5 and "layer_weights_tried" not in fixed  # a number is taken as given
    served = load_spec(json.loads((tmp_path / "fixed" / "calibration.json").read_text()))
    assert served is not None and [layer.weight for layer in served.layers] == [1.5, 1.5]
    with pytest.raises(ConfigError, match=r"export\.unknown\.layer_weight"):
        export_run(
            tiny_run, registries, out_dir=tmp_path / "bad", overrides=[*base, "export.unknown.layer_weight=0"]
        )


def test_a_layer_weight_changes_the_score_and_travels_in_the_spec() -> None:
    (train_f, train_s), ((ours_f, ours_s), _) = _layered()
    layered = fit(train_f, k=3, dims=8, stage_features=train_s, stages=[(2, 24), (3, 8)])
    heavier = layered.with_layer_weight(2.0)
    assert [layer.weight for layer in heavier.layers] == [2.0, 2.0] and layered.layers[0].weight == 0.5
    assert not np.allclose(heavier.components(ours_f, ours_s)[0], layered.components(ours_f, ours_s)[0])
    spec = dataclasses.replace(heavier, knn_threshold=0.5, residual_threshold=-0.5).to_spec()
    loaded = load_spec(json.loads(json.dumps({"unknown": spec})))
    assert loaded is not None
    np.testing.assert_allclose(
        loaded.components(ours_f, ours_s)[0], heavier.components(ours_f, ours_s)[0], atol=1e-5
    )


def test_the_stages_the_score_reads_by_default() -> None:
    from thali.core.config import UnknownConfig

    assert UnknownConfig().stage_indices(7) == [4, 5]  # EfficientNet-Lite: the two before the last
    assert UnknownConfig().stage_indices(3) == []  # too shallow to have earlier stages worth reading
    assert UnknownConfig(stages=[2, 0]).stage_indices(3) == [0, 2]
    with pytest.raises(ValueError, match="different stage indices"):
        UnknownConfig(stages=[1, 1])
    assert UnknownConfig().layer_weight == "auto" and UnknownConfig(layer_weight=0.75).layer_weight == 0.75
    for bad in (0, -1, 11, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="auto, or a number above 0 and at most 10"):
            UnknownConfig(layer_weight=bad)


def test_the_training_photos_own_neighbour_statistics_do_not_depend_on_the_block_size() -> None:
    from thali.core.inference.unknown import _loo_stats, _unit

    bank = _unit(np.random.default_rng(4).normal(0, 1, (50, 6)))
    sims = bank @ bank.T
    np.fill_diagonal(sims, -np.inf)  # each photo without itself
    third = np.sort(sims, axis=1)[:, -3]
    for chunk in (7, 50, 512):
        mean, std = _loo_stats(bank, 3, chunk=chunk)
        assert mean == pytest.approx(third.mean()) and std == pytest.approx(third.std())


def test_the_per_collection_budget_holds_in_every_unseen_collection() -> None:
    """Two unseen collections of our own dishes: a large one that scores like the training photos and a
    small one from other cameras that scores lower. A pooled 5 % budget spends itself on the small one
    (it was 17 % on the worst sealed collection); per collection, each stays within 5 %."""
    rng = np.random.default_rng(4)
    like = rng.normal(1.0, 0.1, (400, 2))  # (k-NN, residual) components of collection A
    other = rng.normal(0.7, 0.1, (100, 2))  # collection B: lower on both scores
    knn, residual = np.concatenate([like, other]).T
    groups = np.array(["A"] * 400 + ["B"] * 100)
    outside = [tuple(rng.normal(0.4, 0.2, (200, 2)).T)]  # other cuisines, to share the budget on

    def shares(t_knn: float, t_res: float) -> dict[str, float]:
        flagged = (knn < t_knn) | (residual < t_res)
        return {g: float(flagged[groups == g].mean()) for g in ("A", "B")} | {"all": float(flagged.mean())}

    pooled = shares(*choose_thresholds((knn, residual), 0.05, outside))
    assert pooled["all"] <= 0.05 and pooled["B"] > 0.15  # within budget overall, not where it matters
    per = shares(*choose_thresholds((knn, residual), 0.05, outside, groups=groups))
    assert per["A"] <= 0.05 and per["B"] <= 0.05
    caught = lambda t: float(np.mean((outside[0][0] < t[0]) | (outside[0][1] < t[1])))  # noqa: E731
    assert caught(choose_thresholds((knn, residual), 0.05, outside, groups=groups)) > 0.3  # still catches
    # one score alone (the top probability of packages without features) follows the same rule
    t = choose_threshold(knn, 0.05, groups)
    assert all((knn[groups == g] < t).mean() <= 0.05 for g in ("A", "B"))
    assert choose_threshold(knn, 0.05) == choose_threshold(knn, 0.05, None)
    with pytest.raises(ValueError, match="group labels"):
        choose_threshold(knn, 0.05, groups[:10])
