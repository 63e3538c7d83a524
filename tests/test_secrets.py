"""Credentials never printed, logged or stored (kalm/core/secrets.py): URLs scrubbed in every log record
(tracebacks included, Prefect's stored run logs too), credential URLs refused in one line where we would
store them (data root, recipe source, S3 endpoint)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kalm.core.secrets import install_log_scrubber, scrub

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
URL = f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/data"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (URL, "s3://***@bucket/data"),
        ("https://user:hf_token123@huggingface.co/x", "https://***@huggingface.co/x"),
        ("https://host/f?X-Amz-Signature=abc&X-Amz-Credential=AK%2F1&v=2", None),
        ("s3://bucket/data", "s3://bucket/data"),
        ("http://127.0.0.1:4200/api and git+https://github.com/org/repo@main", None),
    ],
)
def test_scrub(text: str, want: str | None) -> None:
    got = scrub(text)
    if want is not None:
        assert got == want
    assert SECRET not in got and "abc" not in got.split("Signature=")[-1][:3] and "hf_token123" not in got
    if "127.0.0.1" in text:
        assert got == text  # no user info: unchanged


def test_log_records_and_tracebacks_are_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    install_log_scrubber()
    log = logging.getLogger("kalm.test_secrets")
    with caplog.at_level(logging.INFO):
        log.info("reading %s", URL)
        try:
            raise OSError(f"cannot open {URL}")
        except OSError:
            log.exception("failed")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert "s3://***@bucket/data" in text and SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text


def run_kalm(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kalm", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=300,
    )


def test_credential_urls_are_one_line_refusals(tmp_path: Path) -> None:
    """A data root, a recipe source or an S3 endpoint with credentials: exit 2, one line, no secret."""
    rec = tmp_path / "recipes"
    rec.mkdir()
    (rec / "cred_src.yaml").write_text(
        "name: cred_src\ncategory: faq\nstage: finetune\ntask_type: retrieval\n"
        f"source: {{format: jsonl, path: '{URL}/f.jsonl'}}\nfields: {{query: q, pos: a}}\n"
    )
    runs = [
        run_kalm(["data", "run", "--all", "--data-root", URL], tmp_path),
        run_kalm(["data", "check", "cred_src", "--recipes-dir", str(rec)], tmp_path),
        run_kalm(["data", "run", "--all", "--data-root", "s3://bucket/x"], tmp_path, KALM_S3_ENDPOINT=URL),
    ]
    for p in runs:
        out = p.stdout + p.stderr
        assert p.returncode == 2, out
        assert SECRET not in out and "AKIAIOSFODNN7EXAMPLE" not in out, out
        assert "Traceback" not in out and "credentials in a" in out, out
    assert not (tmp_path / "data").exists()  # nothing was started or written


def test_prefect_run_logs_are_stored_scrubbed() -> None:
    """A flow run that logs a credential URL (through Prefect's run logger: its API handler stores the
    lines in the server's database): what the server stored has no secret."""
    import asyncio

    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogHandler
    from prefect.testing.utilities import prefect_test_harness

    install_log_scrubber()

    @flow
    def leaky() -> str:
        get_run_logger().info("connecting to %s", URL)
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    async def stored(run_id: str) -> list[str]:
        async with get_client() as client:
            flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            return [lg.message for lg in await client.read_logs(log_filter=flt)]

    with prefect_test_harness(server_startup_timeout=120):
        run_id = leaky()
        APILogHandler().flush()  # the shared worker: send what is queued, wait
        messages = asyncio.run(stored(run_id))
    assert any("s3://***@bucket/data" in m for m in messages), messages
    assert not any(SECRET in m or "AKIAIOSFODNN7EXAMPLE" in m for m in messages), messages
