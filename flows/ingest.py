"""Prefect entry points of the data stage alone (``kalm data run``): one recipe and its mixture, or every
recipe of a stage in parallel. Defined in :mod:`kalm.orchestration.flows`."""

from kalm.orchestration.flows import ingest_recipe_flow, ingest_stage_flow

__all__ = ["ingest_recipe_flow", "ingest_stage_flow"]
