"""Experiment tracking beside ``metrics.jsonl``: TensorBoard event files and, when installed and pointed at
a server, MLflow.

- TensorBoard (``tracking.tensorboard``, on by default; needs the ``tensorboard`` package, in the ``dev``
  and ``gpu`` extras): ``<run>/tb/`` gets every numeric step metric as ``train/<name>`` (loss, lr, grad
  norm, focal weight, distillation KL, throughput) and, after the evaluation stage, each score as
  ``eval/<task>/d<dim>``. ``tensorboard --logdir <data root>/runs`` shows every run (the soup's scores are
  in ``runs/soup/<name>.tb``). A resumed run purges the steps after its checkpoint, so curves never double.
- MLflow (``tracking.mlflow``: ``auto`` = when ``mlflow`` is installed and ``MLFLOW_TRACKING_URI`` is set,
  ``true`` = required, ``false``): one MLflow run per training run, the same metrics and the config's
  main keys as parameters.

Tracking never decides anything: it is left out of the job fingerprint, and a tracker that fails to write
logs a warning and stops, the training goes on.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kalm.core.errors import KalmError

log = logging.getLogger(__name__)
TB_DIR = "tb"


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def mlflow_wanted(setting: bool | str) -> bool:
    """Whether MLflow tracks this run: ``auto`` needs the package and ``MLFLOW_TRACKING_URI``."""
    import importlib.util

    installed = importlib.util.find_spec("mlflow") is not None
    if setting is True:
        if not installed:
            raise KalmError("tracking.mlflow: true needs the mlflow package (pip install mlflow)")
        return True
    return setting == "auto" and installed and bool(os.environ.get("MLFLOW_TRACKING_URI"))


class Tracker:
    """Rank 0's trackers for one run; every method is a no-op when nothing is enabled."""

    def __init__(
        self,
        run_dir: Path,
        run_name: str,
        *,
        tensorboard: bool = True,
        mlflow: bool | str = "auto",
        start_step: int = 0,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.tb: Any = None
        self.mlflow: Any = None
        if tensorboard:
            if tensorboard_available():
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops the events a killed run logged after its checkpoint
                self.tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step or None)
            else:
                log.info("tracking: no tensorboard package, step metrics only in metrics.jsonl")
        if mlflow_wanted(mlflow):
            import mlflow as mlf

            mlf.set_experiment("kalm")
            mlf.start_run(run_name=run_name)
            mlf.log_params(dict(params or {}))
            self.mlflow = mlf

    def step(self, metrics: Mapping[str, Any]) -> None:
        """One training step's numbers (``step`` is the x axis; text and NaN values are left out)."""
        step = int(metrics["step"])
        values = {
            k: float(v)
            for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        self._write({f"train/{k}": v for k, v in values.items()}, step)

    def _write(self, values: Mapping[str, float], step: int) -> None:
        try:
            if self.tb is not None:
                for k, v in values.items():
                    self.tb.add_scalar(k, v, step)
            if self.mlflow is not None:
                self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)
        except Exception as err:  # noqa: BLE001 - observing must never stop a run
            log.warning("tracking stopped: %s: %s", type(err).__name__, err)
            self.tb = self.mlflow = None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        self.tb = self.mlflow = None


def log_scores(tb_dir: Path, rows: Sequence[Mapping[str, Any]], step: int) -> bool:
    """Write evaluation scores into a TensorBoard folder (a run's ``tb/``, a soup's ``.tb``); False when
    TensorBoard is not installed."""
    if not rows or not tensorboard_available():
        return False
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for r in rows:
            writer.add_scalar(f"eval/{r['task']}/d{r['dim']}", float(r["main_score"]), step)
    finally:
        writer.close()
    return True
