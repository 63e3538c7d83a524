"""The package's layers, bottom to top, and what each may import (issue #10). Checked on the source: every
``import kalm.X`` / ``from kalm.X import`` (top-level or inside functions) of every module.

    core          errors, configs, schema, storage, layout, fingerprint, results: imports nothing of ours
    data          recipes, readers, ingest, mixtures                       -> core
    training      model, losses, sampler, the job and its launcher         -> core
    mining        encode, cache, search, sample, mine                     -> core, data, training
    evaluation    soup, mteb tasks, scoring, results, compare             -> core, data, training
    pipeline      the DAG over a runner, stage specs, pipeline config     -> every stage
    orchestration Prefect tasks, flows, runner, server                    -> pipeline and below
    cli           the ``kalm`` commands                                   -> everything; nothing imports it
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kalm"
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "training": {"core", "training"},
    "mining": {"core", "data", "training", "mining"},
    "evaluation": {"core", "data", "training", "evaluation"},
    "pipeline": {"core", "data", "training", "mining", "evaluation", "pipeline"},
    "orchestration": {"core", "data", "training", "mining", "evaluation", "pipeline", "orchestration"},
    "cli": set(
        ALL := ("core", "data", "training", "mining", "evaluation", "pipeline", "orchestration", "cli")
    ),
}
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def kalm_imports(path: Path) -> set[str]:
    """The kalm subpackages a module imports (first component after ``kalm.``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        out |= {n.split(".")[1] for n in names if n.startswith("kalm.") and n.count(".") >= 1}
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_its_layer_and_below(path: Path) -> None:
    layer = path.relative_to(PACKAGE).parts[0]
    assert layer in ALLOWED, f"{path}: kalm/{layer}/ is not a known layer"
    bad = kalm_imports(path) - ALLOWED[layer]
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) imports kalm.{sorted(bad)}"


def test_one_top_level_package_and_small_modules() -> None:
    top = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py"}
    assert top <= {"__init__.py", "__main__.py"}, top  # everything lives in a layer
    loop = PACKAGE / "training" / "train.py"  # the training loop reads top to bottom: allowed to be long
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in MODULES
        if p != loop and (n := len(p.read_text().splitlines())) > 520
    }
    assert not long, long
