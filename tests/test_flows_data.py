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
    again = ingest_recipe_flow("f_one", root, [str(folder)])
    assert again["recipes"][0]["cached"] is True
    assert again["mixtures"] and all(m["cached"] for m in again["mixtures"])
