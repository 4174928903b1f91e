from __future__ import annotations

import numpy as np

from thali.core.metrics import (
    ece_noise_floor,
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax,
    summarize,
    topk_accuracy,
)


def test_topk_and_per_class() -> None:
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = np.array([0, 2, 2, 1])
    assert topk_accuracy(logits, labels, 1) == 0.5
    assert topk_accuracy(logits, labels, 2) == 0.75
    result = summarize(logits, labels, ["a", "b", "c"])
    assert result["per_class"]["c"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    assert result["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]


def test_temperature_scaling_fixes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 2000)
    clean = rng.normal(0, 1, (2000, 5))
    clean[np.arange(2000), labels] += 1.5  # about 60 % accurate
    overconfident = clean * 6.0
    t = fit_temperature(overconfident, labels)
    assert 2.5 < t < 9.0
    assert nll(overconfident, labels, t) < nll(overconfident, labels)
    before = expected_calibration_error(softmax(overconfident), labels)
    after = expected_calibration_error(softmax(overconfident, t), labels)
    assert after < 0.05 < before


def test_a_validation_split_answered_all_right_does_not_make_every_answer_certain() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 88)
    logits = rng.normal(0, 0.5, (88, 3))
    logits[np.arange(88), labels] += 3.0  # all right, with a margin, as label smoothing leaves them
    t = fit_temperature(logits, labels)
    assert t > 0.1  # plain NLL runs to the search's lower bound (0.05): 100 % on every photo
    confidence = softmax(logits, t).max(axis=1).mean()
    assert 0.97 < confidence < 0.999  # about what 88 right answers support: 89/90
    assert expected_calibration_error(softmax(logits, t), labels) < 0.03


def test_ece_noise_floor_is_what_a_perfectly_calibrated_model_reads() -> None:
    """Labels drawn from the model's own confidences: the measured ECE lies within the floor's spread,
    and the floor shrinks as the number of photos grows (a target under it cannot be shown)."""
    rng = np.random.default_rng(3)

    def calibrated(n: int) -> tuple[np.ndarray, np.ndarray]:
        probs = softmax(rng.normal(0, 1, (n, 6)) * 3.0)
        top = probs.argmax(1)
        correct = rng.random(n) < probs.max(1)
        return probs, np.where(correct, top, (top + 1) % 6)

    median, p90 = ece_noise_floor(calibrated(300)[0])
    assert 0.02 < median < p90 < 0.12
    measured = [expected_calibration_error(*calibrated(300)) for _ in range(40)]
    assert 0.5 * median < float(np.median(measured)) < 1.5 * median
    big_median, _ = ece_noise_floor(calibrated(30_000)[0], draws=20)
    assert big_median < median / 4
    assert ece_noise_floor(np.zeros((0, 6))) == (0.0, 0.0)
