"""The Prefect UI in a real browser (headless Chromium from Debian's `chromium` package, driven by
Playwright's Python package): after a `kalm retrain` run from the command line against the data root's
`kalm server` server, the UI shows the deployments, the retrain schedule, the loss image and the
evaluation table. Opt-in (about 3 minutes, and Chromium is a system package):

    sudo apt-get install chromium && pip install playwright
    KALM_TEST_BROWSER=1 pytest tests/test_ui_browser.py      # screenshots: $KALM_UI_SHOTS or the tmp dir
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_retrain import setup  # noqa: F401  (the tiny end-to-end pipeline)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    os.environ.get("KALM_TEST_BROWSER") != "1"
    or not Path(CHROMIUM).exists()
    or importlib.util.find_spec("playwright") is None,
    reason="opt-in: KALM_TEST_BROWSER=1 with Debian's chromium and the playwright package",
)
# what this machine's closed network needs (ENV.md): no background connections, no sandbox as root
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _artifact_id(api: str, key: str) -> str:
    found = _post(api, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"})
    assert found, f"no artifact {key!r}"
    return str(found[0]["id"])


def test_the_ui_shows_deployments_schedule_loss_image_and_eval_table(
    setup: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from playwright.sync_api import sync_playwright
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from kalm.orchestration.server import deployments, ensure_server, state_dir_for, stop_server

    shots = Path(os.environ.get("KALM_UI_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    root = setup["root"]
    state = state_dir_for(root)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api, proc = ensure_server(state, _free_port(), wait_s=180)
    ui = api.removesuffix("/api")
    try:
        # a retrain from the command line: it finds the root's server (no PREFECT_API_URL given)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        cmd = [sys.executable, "-m", "kalm.cli", "retrain", "--config", setup["config"], "--data-root", root]
        out = subprocess.run(
            [*cmd, "--recipes-dir", str(setup["recipes"])],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"runs report to {api}" in out.stderr
        with temporary_settings({PREFECT_API_URL: api}):  # what `kalm server` registers at its start
            for d in deployments(setup["config"], root):
                d.apply()
        pages = {
            "deployments": f"{ui}/deployments",
            "loss": f"{ui}/artifacts/artifact/{_artifact_id(api, 'pretrain-loss')}",
            "evaluation": f"{ui}/artifacts/artifact/{_artifact_id(api, 'evaluation')}",
            "stages": f"{ui}/artifacts/artifact/{_artifact_id(api, 'stages')}",
        }
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def visit(name: str, url: str, wait_for: str) -> str:
                page.goto(url)
                page.wait_for_selector(wait_for, timeout=60_000)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
                return page.inner_text("body")

            text = visit("deployments", pages["deployments"], "text=rerun-recipe")
            assert "retrain" in text and "rerun-recipe" in text and "evaluate" in text
            page.get_by_role("link", name="retrain", exact=True).first.click()
            page.wait_for_selector("text=/03:00|Sunday/", timeout=60_000)  # the config's cron 0 3 * * 0, UTC
            page.screenshot(path=str(shots / "schedule.png"), full_page=True)

            visit("loss", pages["loss"], "img[src^='data:image/png']")
            width = page.eval_on_selector("img[src^='data:image/png']", "img => img.naturalWidth")
            assert width > 100  # the PNG decoded: a real image, not a broken link

            text = visit("evaluation", pages["evaluation"], "table")
            headers = page.eval_on_selector_all("table th", "ths => ths.map(t => t.innerText.trim())")
            assert "model" in headers and any(h.startswith("mean (") for h in headers), headers
            assert "base" in text and "soup" in text
            text = visit("stages", pages["stages"], "table")
            assert "pretrain" in text and "finetune" in text
            browser.close()
    finally:
        stop_server(state, proc)
    print("screenshots:", *(str(shots / f"{n}.png") for n in (*pages, "schedule")))
