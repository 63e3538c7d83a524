"""Prefect entry points of the retraining DAG: what ``prefect deploy --prefect-file infra/prefect.yaml``
loads (``flows/retrain.py:retrain_flow``) and what a reader opens first.

The flows are defined in :mod:`kalm.orchestration.flows` (thin: they parse their parameters once and run
the plain DAG function :func:`kalm.pipeline.dag.run_retrain` on Prefect tasks).
"""

from kalm.orchestration.flows import evaluate_flow, rerun_recipe_flow, retrain_flow

__all__ = ["evaluate_flow", "rerun_recipe_flow", "retrain_flow"]
