"""The data flows on a real (temporary) Prefect server: one recipe, and a whole stage in parallel."""

from __future__ import annotations

from pathlib import Path

import pytest

from kalm.core.storage import read_manifest
from tests.conftest import faq_rows


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_ingest_flows(prefect_server, recipe_dir, tmp_path: Path) -> None:
    from kalm.orchestration.flows import ingest_recipe_flow, ingest_stage_flow

    recipe_dir("f_one", faq_rows(25, "one"))
    folder = recipe_dir("f_two", faq_rows(25, "two", seed=3))
    root = str(tmp_path / "data")
    out = ingest_stage_flow(["finetune"], ["f_one", "f_two"], None, root, [str(folder)])
    assert {r["name"] for r in out["recipes"]} == {"f_one", "f_two"}
    assert {m["name"]: m["rows"] for m in out["mixtures"]}["f_two"] == 25
    from kalm.core.storage import DataRoot

    assert read_manifest(DataRoot.from_uri(root), "mixtures/finetune/f_one")["rows_out"] == 25
    again = ingest_recipe_flow("f_one", root, [str(folder)], return_state=True)
    out = again.result()
    assert out["recipes"][0]["cached"] is True
    assert out["mixtures"] and all(m["cached"] for m in out["mixtures"])
    # in the UI a cache hit is a "Cached" state (a Completed one), not one more "Completed"
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.state_details.flow_run_id]))
        )
    states = {r.name: r.state.name for r in runs if r.state}
    assert runs and set(states.values()) == {"Cached"}, states  # the recipe and its stage mixture


def test_every_flow_parameter_has_a_description_and_choices_are_enums() -> None:
    """The UI's custom-run form: Prefect reads each flow's parameter schema; every parameter of every flow
    carries a description, and stages / executors are drop-downs (enums), not free text."""
    from prefect.utilities.callables import parameter_schema

    from kalm.orchestration import flows

    for f in (
        flows.retrain_flow,
        flows.rerun_recipe_flow,
        flows.evaluate_flow,
        flows.ingest_recipe_flow,
        flows.ingest_stage_flow,
    ):
        props = parameter_schema(f.fn).model_dump()["properties"]
        assert all(p.get("description") for p in props.values()), (f.name, props)
        assert "force_recipes" not in props
    stages = parameter_schema(flows.retrain_flow.fn).model_dump()["properties"]["stages"]
    assert stages["anyOf"][0]["items"]["enum"][:3] == ["ingest", "mine", "pretrain"]
    ex = parameter_schema(flows.ingest_stage_flow.fn).model_dump()["properties"]["executor"]
    assert ex["anyOf"][0]["enum"] == ["local", "ray"]


def test_the_evaluation_overview_has_one_row_per_model_and_dim() -> None:
    """Task types as columns, means over the tasks every model has, and no cell that breaks a row."""
    from kalm.evaluation.report import type_means_markdown

    def row(task: str, ttype: str, dim: int, score: float) -> dict[str, object]:
        return {"task": task, "task_type": ttype, "dim": dim, "main_score": score}

    md = type_means_markdown(
        {
            "base": [row("A", "STS", 8, 0.5), row("B", "Retrieval", 8, 0.2), row("C", "STS", 8, 0.9)],
            "soup\nv2|x": [row("A", "STS", 8, 0.7), row("B", "Retrieval", 8, 0.4)],  # no C: left out
        }
    )
    lines = md.strip().splitlines()
    assert lines[0] == "| model | dim | Retrieval | STS | mean (2 tasks) |"
    assert lines[2] == "| base | 8 | 20.00 | 50.00 | 35.00 |"
    assert lines[3] == "| soup v2\\|x | 8 | 40.00 | 70.00 | 55.00 |" and len(lines) == 4
