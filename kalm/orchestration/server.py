"""A local Prefect server plus the pipeline's deployments, for `kalm server`.

* :func:`ensure_server` reuses the server at ``PREFECT_API_URL`` when one answers, else this data root's
  running server, else starts ``prefect server start`` on 127.0.0.1 with its state (SQLite) under the data
  root, recorded in ``server.json`` there. A port that answers for another root is refused, not joined.
* :func:`use_root_database` points a CLI command at the same database: ``PREFECT_API_URL`` when set, else
  the data root's ``kalm server`` when it is up, else Prefect's on-demand (ephemeral) server over the
  root's SQLite file. So ``kalm retrain``, ``demo`` and ``data run`` show up in ``kalm server``'s UI.
* :func:`deployments` builds the three deployments: the full retrain (cron from the pipeline config,
  parameters editable in the UI), a single-recipe rerun, and evaluate-a-model.
* :func:`serve_deployments` registers them and runs their flow runs in this process (``prefect.serve``).

To use a team's server or Prefect Cloud instead, set ``PREFECT_API_URL`` (and ``PREFECT_API_KEY``) before
``kalm server``: nothing is started then, only the deployments are registered and served.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from kalm.core.errors import KalmError
from kalm.core.process import pid_alive

log = logging.getLogger(__name__)
DEFAULT_PORT = 4200


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


SERVER_FILE = "server.json"  # {api, pid, port}: the running server of this state dir (data root)


def database_url(state_dir: Path) -> str:
    """The SQLite database of a data root's Prefect state (the same file for every command and server)."""
    return f"sqlite+aiosqlite:///{Path(state_dir).resolve() / 'prefect.db'}"


def root_server(state_dir: Path) -> str | None:
    """The API URL of this state dir's running server (``server.json``), if its process lives and answers."""
    try:
        info = json.loads((Path(state_dir) / SERVER_FILE).read_text(encoding="utf-8"))
        api, pid = str(info["api"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return api if pid_alive(pid) and api_healthy(api) else None


def use_root_database(state_dir: Path) -> str:
    """Point this process's Prefect client at the data root's runs; call before Prefect is imported.

    Returns where runs go: ``PREFECT_API_URL`` when set (a team server, Prefect Cloud), else the root's
    ``kalm server`` when it is up (its URL is exported), else ``"ephemeral"``: Prefect's on-demand server
    over the root's database file (exported as ``PREFECT_SERVER_DATABASE_CONNECTION_URL``), which
    ``kalm server`` opens later, so every run of the root is in one UI.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" in sys.modules:  # settings already read (an in-process caller): nothing would change
        log.debug("Prefect already imported; its settings stay as they are")
        return "unchanged"
    api = root_server(state_dir)
    if api:
        os.environ["PREFECT_API_URL"] = api
        return api
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url(state_dir)
    return "ephemeral"


def ensure_server(state_dir: Path, port: int = DEFAULT_PORT, wait_s: float = 120) -> tuple[str, Any]:
    """(api_url, process or None). Starts a server only when neither PREFECT_API_URL nor this state dir's
    server answers; refuses a port where another Prefect server answers."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        if not api_healthy(existing):
            raise KalmError(f"PREFECT_API_URL={existing} does not answer /health")
        return existing, None
    own = root_server(state_dir)
    if own:
        return own, None
    api = f"http://127.0.0.1:{port}/api"
    if api_healthy(api):
        raise KalmError(
            f"port {port} already answers as a Prefect server that is not this data root's ({state_dir}): "
            f"stop it, pick another --port, or set PREFECT_API_URL={api} to use that server on purpose"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(state_dir),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url(state_dir),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        # the UI's pages call this URL: without it they call port 4200 whatever --port says
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_API_PORT": str(port),
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
            tmp = state_dir / f".{SERVER_FILE}.tmp"
            tmp.write_text(json.dumps({"api": api, "pid": proc.pid, "port": port}), encoding="utf-8")
            tmp.replace(state_dir / SERVER_FILE)
            log.info("Prefect server up at %s (UI: %s)", api, api[: -len("/api")])
            return api, proc
        time.sleep(0.5)
    proc.terminate()
    raise KalmError(f"prefect server did not answer within {wait_s:.0f} s; see {state_dir / 'server.log'}")


def stop_server(state_dir: Path, proc: Any) -> None:
    """Stop a server :func:`ensure_server` started and forget it (``server.json``)."""
    (Path(state_dir) / SERVER_FILE).unlink(missing_ok=True)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def state_dir_for(data_root: str) -> Path:
    """The local server's state (SQLite): under a local data root, else under ~/.kalm (kalm.core.layout)."""
    from kalm.core.layout import prefect_home

    return prefect_home(data_root)


def registered_state(flow_name: str, name: str) -> tuple[bool | None, bool | None]:
    """(paused, schedule active) of a deployment already on the server, (None, None) if it is new: a pause
    in the UI (of the deployment or of its schedule) survives the re-registration of a restart."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            d = client.read_deployment_by_name(f"{flow_name}/{name}")
        except ObjectNotFound:
            return None, None
    active = [bool(s.active) for s in d.schedules]
    return bool(d.paused), (all(active) if active else None)


def deployments(pipeline_config: str, data_root: str | None) -> list[Any]:
    """The pipeline's deployments, ready for ``prefect.serve``: the retrain one on the config's cron in its
    timezone; paused deployments and schedules stay paused."""
    from prefect.schedules import Cron

    from kalm.orchestration.flows import evaluate_flow, rerun_recipe_flow, retrain_flow
    from kalm.pipeline.config import load_pipeline_config

    pc = load_pipeline_config(pipeline_config)
    common = {"data_root": data_root}
    registered = {
        name: registered_state(flow.name, name)
        for flow, name in (
            (retrain_flow, "retrain"),
            (rerun_recipe_flow, "rerun-recipe"),
            (evaluate_flow, "evaluate"),
        )
    }
    active = registered["retrain"][1]
    return [
        retrain_flow.to_deployment(
            name="retrain",
            schedule=Cron(pc.schedule.cron, timezone=pc.schedule.timezone, active=active is not False),
            paused=registered["retrain"][0],
            parameters={"config": str(pipeline_config), **common},
            description="Full retraining DAG; edit the parameters in the UI before a custom run.",
            tags=["kalm", "retrain"],
        ),
        rerun_recipe_flow.to_deployment(
            name="rerun-recipe",
            paused=registered["rerun-recipe"][0],
            parameters={"recipe": "api_docs", "config": str(pipeline_config), **common},
            description="Re-ingest one recipe (set `recipe`) and recompute only what depends on it.",
            tags=["kalm", "data"],
        ),
        evaluate_flow.to_deployment(
            name="evaluate",
            paused=registered["evaluate"][0],
            parameters={"model": "minilm", "config": pc.eval.config, **common},
            description="Evaluate one model folder on the configured tasks (set `model`).",
            tags=["kalm", "eval"],
        ),
    ]


def serve_deployments(pipeline_config: str, data_root: str | None) -> None:
    """Register the deployments and execute their runs until interrupted."""
    from prefect import serve

    # pause_on_shutdown=False: Prefect would pause every served deployment when this process stops, and the
    # next start (which keeps pauses, see registered_state) could not tell that from a pause made in the UI
    serve(*deployments(pipeline_config, data_root), pause_on_shutdown=False, print_starting_message=True)
