"""A local Prefect server plus the pipeline's deployments, for `kalm server`.

* :func:`ensure_server` reuses the server at ``PREFECT_API_URL`` when one answers, else starts
  ``prefect server start`` on 127.0.0.1 with its state (SQLite) under the data root.
* :func:`deployments` builds the three deployments: the full retrain (cron from the pipeline config,
  parameters editable in the UI), a single-recipe rerun, and evaluate-a-model.
* :func:`serve_deployments` registers them and runs their flow runs in this process (``prefect.serve``).

To use a team's server or Prefect Cloud instead, set ``PREFECT_API_URL`` (and ``PREFECT_API_KEY``) before
``kalm server``: nothing is started then, only the deployments are registered and served.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from kalm.core.errors import KalmError

log = logging.getLogger(__name__)
DEFAULT_PORT = 4200


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def ensure_server(state_dir: Path, port: int = DEFAULT_PORT, wait_s: float = 120) -> tuple[str, Any]:
    """(api_url, process or None). Starts a server only when none answers at PREFECT_API_URL."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        if not api_healthy(existing):
            raise KalmError(f"PREFECT_API_URL={existing} does not answer /health")
        return existing, None
    api = f"http://127.0.0.1:{port}/api"
    if api_healthy(api):
        return api, None
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(state_dir),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=(state_dir / "server.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise KalmError(f"prefect server exited early; see {state_dir / 'server.log'}")
        if api_healthy(api):
            log.info("Prefect server up at %s (UI: %s)", api, api[: -len("/api")])
            return api, proc
        time.sleep(0.5)
    proc.terminate()
    raise KalmError(f"prefect server did not answer within {wait_s:.0f} s; see {state_dir / 'server.log'}")


def state_dir_for(data_root: str) -> Path:
    """The local server's state (SQLite): under a local data root, else under ~/.kalm (kalm.core.layout)."""
    from kalm.core.layout import prefect_home

    return prefect_home(data_root)


def deployments(pipeline_config: str, data_root: str | None) -> list[Any]:
    """The pipeline's deployments, ready for ``prefect.serve``."""
    from kalm.orchestration.flows import evaluate_flow, rerun_recipe_flow, retrain_flow
    from kalm.pipeline.config import load_pipeline_config

    pc = load_pipeline_config(pipeline_config)
    common = {"data_root": data_root}
    return [
        retrain_flow.to_deployment(
            name="retrain",
            cron=pc.schedule.cron,
            parameters={"config": str(pipeline_config), **common},
            description="Full retraining DAG; edit the parameters in the UI before a custom run.",
            tags=["kalm", "retrain"],
        ),
        rerun_recipe_flow.to_deployment(
            name="rerun-recipe",
            parameters={"recipe": "api_docs", "config": str(pipeline_config), **common},
            description="Re-ingest one recipe (set `recipe`) and recompute only what depends on it.",
            tags=["kalm", "data"],
        ),
        evaluate_flow.to_deployment(
            name="evaluate",
            parameters={"model": "minilm", "config": pc.eval.config, **common},
            description="Evaluate one model folder on the configured tasks (set `model`).",
            tags=["kalm", "eval"],
        ),
    ]


def serve_deployments(pipeline_config: str, data_root: str | None) -> None:
    """Register the deployments and execute their runs until interrupted."""
    from prefect import serve

    serve(*deployments(pipeline_config, data_root), print_starting_message=True)
