"""The kalm CLI: every command has --help; user mistakes are one line on stderr with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kalm.cli import app
from tests.conftest import faq_rows

runner = CliRunner()


@pytest.mark.parametrize(
    "args", [[], ["data"], ["data", "list"], ["data", "new"], ["data", "check"], ["data", "run"], ["demo"]]
)
def test_help_everywhere(args: list[str]) -> None:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_list_shows_recipes_and_rows(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("faq", faq_rows(10))
    res = runner.invoke(
        app, ["data", "list", "--recipes-dir", str(folder), "--data-root", str(tmp_path / "d")]
    )
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("faq "))
    assert "finetune" in line and "retrieval" in line and "never" in line
    assert "code_docstring" in res.output  # built-in recipes too


def test_new_then_check_then_contract(tmp_path: Path) -> None:
    d = tmp_path / "recipes"
    res = runner.invoke(app, ["data", "new", "my_source", "--dir", str(d)])
    assert res.exit_code == 0, res.output
    assert (d / "my_source.yaml").exists() and (d / "samples" / "my_source.jsonl").exists()
    res = runner.invoke(app, ["data", "check", "my_source", "--recipes-dir", str(d)])
    assert res.exit_code == 0, res.output
    assert "5 sample records -> 5 rows" in res.output and '"query"' in res.output
    res = runner.invoke(app, ["data", "new", "my_source", "--dir", str(d)])
    assert res.exit_code == 2 and "already exists" in res.output


def _one_line_error(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "kalm", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_user_mistakes_are_one_line(recipe_dir, tmp_path: Path) -> None:
    folder = recipe_dir("faq", faq_rows(5))
    assert "unknown recipe 'nope'" in _one_line_error(["data", "check", "nope", "--recipes-dir", str(folder)])
    assert "--stage" in _one_line_error(
        ["data", "run", "--all", "--stage", "middle", "--recipes-dir", str(folder)]
    )
    # a broken recipe file: reported in one line and left out; only commands that need it fail
    (folder / "broken.yaml").write_text("name: broken\nstage: finetune\nextra_key: 1\n")
    listed = subprocess.run(
        [sys.executable, "-m", "kalm", "data", "list", "--recipes-dir", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "faq " in listed.stdout and "broken" not in listed.stdout
    (warning,) = [ln for ln in listed.stderr.splitlines() if ln.strip()]
    assert warning.startswith("warning: recipe skipped: ") and "broken.yaml" in warning
    assert "unknown key 'extra_key'" in warning
    msg = _one_line_error(["data", "check", "broken", "--recipes-dir", str(folder)])
    assert "broken.yaml" in msg and "unknown key 'extra_key'" in msg
    (folder / "broken.yaml").write_text("name: [unclosed\n")
    assert "invalid YAML" in _one_line_error(["data", "check", "broken", "--recipes-dir", str(folder)])
    (folder / "broken.yaml").unlink()
    assert "recipes folder not found" in _one_line_error(
        ["data", "list", "--recipes-dir", str(tmp_path / "no")]
    )
    (folder / "samples" / "faq.jsonl").unlink()
    assert "has no samples" in _one_line_error(["data", "check", "faq", "--recipes-dir", str(folder)])


def test_check_fails_when_samples_yield_nothing(tmp_path: Path) -> None:
    d = tmp_path / "r"
    (d / "samples").mkdir(parents=True)
    (d / "empty.yaml").write_text(
        "name: empty\ncategory: c\nstage: finetune\ntask_type: retrieval\n"
        "source: {format: jsonl, path: raw.jsonl}\nfields: {query: q, pos: a}\n"
    )
    (d / "samples" / "empty.jsonl").write_text(json.dumps({"wrong": "field"}) + "\n")
    res = runner.invoke(app, ["data", "check", "empty", "--recipes-dir", str(d)])
    assert res.exit_code == 2 and "produced no rows" in res.output and "missing_field" in res.output
