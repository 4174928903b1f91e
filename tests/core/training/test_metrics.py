from __future__ import annotations

import numpy as np

from thali.core.training.metrics import (
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
