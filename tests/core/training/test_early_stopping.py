"""EarlyStopping, the rule Trainer.fit's loop applies after every epoch (one typed object, not a dict)."""

from __future__ import annotations

from thali.core.training.trainer import EarlyStopping


def _steps(stopping: EarlyStopping, values: list[float]) -> list[tuple[bool, bool]]:
    return [(step.improved, step.stop) for step in map(stopping.step, values)]


def test_top1_improves_upwards_and_patience_counts_epochs_in_a_row() -> None:
    stopping = EarlyStopping("val_top1", patience=2)
    assert _steps(stopping, [0.5, 0.6, 0.6, 0.7, 0.65, 0.65]) == [
        (True, False), (True, False), (False, False), (True, False), (False, False), (False, True),
    ]  # fmt: skip
    assert stopping.best == 0.7 and stopping.bad_epochs == 2


def test_loss_improves_downwards_by_more_than_min_delta() -> None:
    stopping = EarlyStopping("val_loss", patience=1, min_delta=0.05)
    assert _steps(stopping, [1.0, 0.97, 0.9]) == [(True, False), (False, True), (True, False)]
    assert stopping.best == 0.9


def test_disabled_still_tracks_the_best_epoch_and_never_stops() -> None:
    stopping = EarlyStopping("val_top1", patience=1, enabled=False)
    assert _steps(stopping, [0.9, 0.1, 0.1, 0.1]) == [(True, False)] + [(False, False)] * 3
    assert stopping.best == 0.9
