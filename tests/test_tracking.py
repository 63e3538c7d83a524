"""Experiment tracking: TensorBoard event files written by the tracker, read back with TensorBoard's own
reader; a resumed run purges the steps after its checkpoint; evaluation scores land beside them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm.training.tracking import TB_DIR, Tracker, log_scores, mlflow_wanted

pytest.importorskip("tensorboard")


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics(step: int) -> dict[str, object]:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-4, "source": "faq", "grad_norm": float("nan")}


def test_step_metrics_become_tensorboard_scalars_and_a_resume_does_not_double_them(tmp_path: Path) -> None:
    t = Tracker(tmp_path, "r", mlflow=False)
    for step in (1, 2, 3, 4):  # a run killed after step 4, its checkpoint at step 2
        t.step(_metrics(step))
    t.close()
    resumed = Tracker(tmp_path, "r", mlflow=False, start_step=3)
    for step in (3, 4, 5):
        resumed.step(_metrics(step))
    resumed.close()
    got = _scalars(tmp_path / TB_DIR)
    assert set(got) == {"train/loss", "train/lr"}  # text and NaN values are left out
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5]
    assert got["train/loss"][4] == (5, 0.2)


def test_scores_are_logged_per_task_and_dim(tmp_path: Path) -> None:
    rows = [
        {"task": "SciFact", "dim": 256, "main_score": 0.61},
        {"task": "SciFact", "dim": 128, "main_score": 0.5},
    ]
    assert log_scores(tmp_path / "soup.tb", rows, 7)
    assert _scalars(tmp_path / "soup.tb") == {
        "eval/SciFact/d256": [(7, 0.61)],
        "eval/SciFact/d128": [(7, 0.5)],
    }
    assert not log_scores(tmp_path / "none.tb", [], 0)


def test_mlflow_is_used_only_when_installed_and_pointed_at(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not mlflow_wanted("auto") and not mlflow_wanted(False)
    if importlib.util.find_spec("mlflow") is None:
        from kalm.core.errors import KalmError

        with pytest.raises(KalmError, match="needs the mlflow package"):
            mlflow_wanted(True)
