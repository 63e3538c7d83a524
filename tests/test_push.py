"""`kalm push`: a model folder with its card goes to the Hugging Face Hub. Nothing reaches the Hub from
here, so the upload call itself is recorded (what repo, which folder, private, what is left out), and the
real client is run against an endpoint that refuses connections: one line, no token printed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kalm.core.errors import KalmError
from kalm.evaluation.hub import IGNORE, push_model
from kalm.training.config import resolve_model_path


class RecordingApi:
    """The two calls push_model makes on huggingface_hub.HfApi, recorded instead of sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw: Any) -> Any:
        self.calls.append(("upload_folder", kw))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "final"
    shutil.copytree(resolve_model_path("minilm"), folder)
    (folder / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# card\n")
    return folder


def test_push_uploads_the_folder_private_by_default(model_folder: Path) -> None:
    api = RecordingApi()
    url = push_model(model_folder, "me/kalm-demo", api=api)
    assert url == "https://huggingface.co/me/kalm-demo/commit/abc"
    (c1, create), (c2, upload) = api.calls
    assert c1 == "create_repo" and create == {
        "repo_id": "me/kalm-demo",
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
    }
    assert c2 == "upload_folder" and upload["folder_path"] == str(model_folder)
    assert upload["repo_type"] == "model" and upload["ignore_patterns"] == IGNORE
    assert upload["commit_message"] == "kalm-pipeline: upload final"


def test_push_refuses_what_is_not_a_finished_model(model_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(KalmError, match="must be owner/name"):
        push_model(model_folder, "no-owner", api=RecordingApi())
    (model_folder / "README.md").unlink()
    with pytest.raises(KalmError, match=r"has no model card \(README.md\)"):
        push_model(model_folder, "me/x", api=RecordingApi())
    with pytest.raises(KalmError, match="not a sentence-transformers model folder"):
        push_model(tmp_path, "me/x", api=RecordingApi())


def test_an_unreachable_hub_is_one_line_and_the_token_stays_secret(
    model_folder: Path, tmp_path: Path
) -> None:
    token = "hf_" + "k" * 30
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "kalm.cli", "push", str(model_folder), "me/kalm-demo"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1]
        == "error: push to me/kalm-demo failed: [Errno 111] Connection refused"
    )
    assert "Traceback" not in out.stderr and token not in out.stderr + out.stdout
    offline = subprocess.run(
        cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300
    )
    assert offline.returncode == 2 and "offline mode is on" in offline.stderr
