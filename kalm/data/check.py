"""``kalm data check``: run one recipe on its committed samples into a throwaway data root.

>>> rows, result = check_recipe(discover().get("api_docs"), load_ingest_config())   # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from typing import Any

from kalm.core.errors import KalmError
from kalm.core.layout import shard_dir
from kalm.core.results import StageResult
from kalm.core.storage import DataRoot, read_rows
from kalm.data.config import IngestConfig
from kalm.data.ingest import run_ingest_recipe
from kalm.data.recipes import LoadedRecipe


def check_recipe(lr: LoadedRecipe, cfg: IngestConfig) -> tuple[list[dict[str, Any]], StageResult]:
    """Canonical rows of a recipe's samples and the ingest result; a KalmError when it yields nothing."""
    sample = lr.sample_path()
    if not sample.exists():
        raise KalmError(f"recipe {lr.name!r} has no samples: expected {sample} with 5-20 real source lines")
    with tempfile.TemporaryDirectory(prefix="kalm-check-") as tmp:
        root = DataRoot.from_uri(tmp)
        res = run_ingest_recipe(lr, root, cfg, use_samples=True, force=True)
        rows = read_rows(root, shard_dir(lr.recipe.stage, lr.name)).to_pylist()
    if res.rows == 0:
        raise KalmError(f"recipe {lr.name!r} produced no rows from {sample}: drops {res.manifest['drops']}")
    return rows, res
