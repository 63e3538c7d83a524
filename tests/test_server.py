"""`kalm server` for real: a Prefect server on loopback, the three deployments registered and served by a
`kalm server` process, and a single-recipe rerun triggered through the API until it completes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kalm.core.storage import DataRoot, read_manifest
from tests.conftest import faq_rows


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a process started in its own session, SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from kalm.orchestration.server import ensure_server, stop_server

    state = tmp_path_factory.mktemp("prefect")
    old = os.environ.pop("PREFECT_API_URL", None)
    api, proc = ensure_server(state, _free_port(), wait_s=180)
    assert proc is not None, "a fresh server must have been started"
    yield api
    stop_server(state, proc)
    if old is not None:
        os.environ["PREFECT_API_URL"] = old


def test_deployments_and_rerun_via_api(server: str, recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("srv_faq", faq_rows(20, "srv"))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        "name: srvtest\nschedule: {cron: '0 4 * * 1', timezone: UTC}\n"
        "data: {recipes: [srv_faq]}\n"
        "pretrain: {config: pretrain_demo.yaml}\nfinetune: {config: finetune_demo.yaml}\n"
    )
    root = tmp_path / "data"
    env = {**os.environ, "PREFECT_API_URL": server, "KALM_RECIPES_PATH": str(folder)}
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "kalm.cli", "server", "--config", str(pipeline), "--data-root", str(root)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Prefect reads its settings once: an earlier test may have imported it without PREFECT_API_URL
    # (ephemeral mode), so the client here must be pointed at the server explicitly.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: server}):
            names = _wait_deployments(serve, tmp_path / "serve.log")
            assert {"retrain/retrain", "rerun_recipe/rerun-recipe", "evaluate/evaluate"} <= names

            from prefect.deployments import run_deployment

            run = run_deployment(
                "rerun_recipe/rerun-recipe",
                parameters={"recipe": "srv_faq", "downstream": False},
                timeout=300,
            )
            assert run.state is not None and run.state.is_completed(), (
                run.state,
                (tmp_path / "serve.log").read_text()[-3000:],
            )
            m = read_manifest(DataRoot.from_uri(str(root)), "mixtures/finetune/srv_faq")
            assert m is not None and m["rows_out"] == 20
            assert (root / "pipeline" / "srvtest" / "latest.json").exists()
    finally:
        _stop_group(serve)
    from prefect.client.orchestration import get_client

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        # stopping `kalm server` does not pause its deployments (a restart keeps only pauses made by users)
        assert not client.read_deployment_by_name("retrain/retrain").paused


def _wait_deployments(serve: subprocess.Popen[bytes], log: Path, wait_s: float = 180) -> set[str]:
    """Full names (flow/deployment) once the serve process has registered them; the retrain one must carry
    the config's cron schedule."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def listed() -> tuple[set[str], list[str]]:
        async with get_client() as client:
            deps = await client.read_deployments()
            flows = {f.id: f.name for f in await client.read_flows()}
            crons = [
                getattr(s.schedule, "cron", "") for d in deps if d.name == "retrain" for s in d.schedules
            ]
            return {f"{flows[d.flow_id]}/{d.name}" for d in deps}, crons

    deadline = time.time() + wait_s
    while time.time() < deadline:
        if serve.poll() is not None:
            pytest.fail(f"kalm server exited {serve.returncode}: {log.read_text()[-3000:]}")
        names, crons = asyncio.run(listed())
        if len(names) >= 3:
            assert "0 4 * * 1" in crons
            return names
        time.sleep(2)
    pytest.fail(f"deployments not registered in {wait_s} s: {log.read_text()[-3000:]}")


def _post(api: str, path: str, body: dict[str, object]) -> list[dict[str, Any]]:
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return list(json.loads(r.read()))


def _flow_runs(api: str, flow: str) -> int:
    """How many runs of ``flow`` the server's database holds (the REST API, as the UI reads it)."""
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{api}/flow_runs/filter",
        data=json.dumps({"flows": {"name": {"any_": [flow]}}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return len(json.loads(r.read()))


def test_cli_runs_land_in_the_data_roots_database(
    recipe_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kalm data run` with no server up writes to the data root's Prefect database through a temporary
    server; `kalm server`'s server over that root then shows the run, and the next CLI run reports to it
    directly. A port already served for another root is refused, not joined."""
    from kalm.core.errors import KalmError
    from kalm.orchestration.server import SERVER_FILE, ensure_server, state_dir_for, stop_server

    folder = recipe_dir("one_db", faq_rows(12, "odb"))
    root = tmp_path / "data"
    drop = ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_HOME")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"KALM_RECIPES_PATH": str(folder)}
    cmd = [sys.executable, "-m", "kalm.cli", "data", "run", "one_db", "--data-root", str(root)]

    def data_run() -> str:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    assert "Starting temporary server" in data_run()
    state = state_dir_for(str(root))
    assert (state / "prefect.db").is_file()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    port = _free_port()
    api, proc = ensure_server(state, port, wait_s=180)
    try:
        assert proc is not None and (state / SERVER_FILE).is_file()
        assert _flow_runs(api, "ingest_recipe") == 1  # the earlier CLI run, in the server's database
        second = data_run()
        assert "Starting temporary server" not in second and f"runs report to {api}" in second
        assert _flow_runs(api, "ingest_recipe") == 2
        # the CLI run's log holds the project's lines, each once
        (last,) = _post(api, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
        logs = _post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [last["id"]]}}, "limit": 200})
        ours = [(r["name"], r["message"], r["timestamp"]) for r in logs if r["name"].startswith("kalm.")]
        assert ours and len(ours) == len(set(ours)), ours
        assert ensure_server(state, _free_port()) == (api, None)  # the same root: its running server
        with pytest.raises(KalmError, match=rf"port {port} already answers .* not this data root's"):
            ensure_server(tmp_path / "other", port)
    finally:
        stop_server(state, proc)
    assert not (state / SERVER_FILE).exists()


def test_a_pause_survives_re_registration_and_the_timezone_is_kept(
    server: str, recipe_dir, tmp_path: Path
) -> None:
    """What `kalm server` does at each start (register the deployments) keeps a pause made in the UI, of the
    deployment and of its schedule, and the schedule carries the pipeline config's timezone."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from kalm.orchestration.server import deployments

    folder = recipe_dir("tz_faq", faq_rows(8, "tz"))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        "name: tztest\nschedule: {cron: '30 6 * * 1-5', timezone: Europe/Berlin}\n"
        "data: {recipes: [tz_faq]}\npretrain: {config: pretrain_demo.yaml}\n"
        "finetune: {config: finetune_demo.yaml}\n"
    )
    assert folder.is_dir()

    def register() -> None:
        for d in deployments(str(pipeline), str(tmp_path / "data")):
            d.apply()

    with temporary_settings({PREFECT_API_URL: server}):
        register()
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("retrain/retrain")
            (sched,) = dep.schedules
            assert sched.schedule.timezone == "Europe/Berlin" and sched.schedule.cron == "30 6 * * 1-5"
            assert not dep.paused and sched.active
            client.pause_deployment(dep.id)
            client.update_deployment_schedule(dep.id, sched.id, active=False)
        register()  # a restart
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("retrain/retrain")
            assert dep.paused and [s.active for s in dep.schedules] == [False]
            assert dep.schedules[0].schedule.timezone == "Europe/Berlin"
            client.resume_deployment(dep.id)
        register()
        with get_client(sync_client=True) as client:
            assert not client.read_deployment_by_name("retrain/retrain").paused


def test_kalm_deploy_and_a_process_worker_run_a_pool_deployment(server: str, tmp_path: Path) -> None:
    """`kalm deploy --create-pools` creates kalm-local, deploys infra/prefect.yaml's deployments (named
    *-pool: the served ones stay), names kalm-gpu as missing and exits 0; a real `prefect worker` on the
    process pool then runs a rerun-recipe-pool flow run (a demo recipe) to completion in this checkout, with
    no variable but the server's URL."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {k: v for k, v in os.environ.items() if k != "KALM_RECIPES_PATH"} | {"PREFECT_API_URL": server}
    out = subprocess.run(
        [sys.executable, "-m", "kalm.cli", "deploy", "--create-pools"],
        env=env,
        cwd=tmp_path,  # any folder: prefect deploy runs from the repository root
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "created work pool kalm-local (process)" in out.stdout
    assert "deployed rerun-recipe-pool (pool kalm-local, prefect.yaml)" in out.stdout
    assert "skipped retrain-gpu: work pool kalm-gpu does not exist (prefect work-pool create kalm-gpu" in (
        out.stdout
    )

    async def names() -> dict[str, str | None]:
        async with get_client() as client:
            flows = {f.id: f.name for f in await client.read_flows()}
            return {f"{flows[d.flow_id]}/{d.name}": d.work_pool_name for d in await client.read_deployments()}

    root = tmp_path / "data"
    with temporary_settings({PREFECT_API_URL: server}):
        deps = asyncio.run(names())
        assert deps["rerun_recipe/rerun-recipe-pool"] == "kalm-local"
        assert deps["retrain/retrain-pool"] == "kalm-local" and "retrain/retrain-gpu" not in deps
        run = run_deployment(
            "rerun_recipe/rerun-recipe-pool",
            parameters={"recipe": "package_descriptions", "data_root": str(root), "downstream": False},
            timeout=0,  # scheduled; the worker picks it up
        )
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "kalm-local"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            state = None
            while time.time() < deadline:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    break
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(2)
            assert state is not None and state.is_completed(), (
                state,
                (tmp_path / "worker.log").read_text()[-3000:],
            )
        finally:
            _stop_group(worker)
    m = read_manifest(DataRoot.from_uri(str(root)), "mixtures/pretrain/package_descriptions")
    assert m is not None and m["rows_out"] > 100
    # the project's own INFO lines are in the run's log, beside Prefect's
    logs = _post(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [str(run.id)]}}, "limit": 200})
    assert any(r["name"].startswith("kalm.") for r in logs), sorted({r["name"] for r in logs})
