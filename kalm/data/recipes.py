"""Category sources ("data recipes"): one YAML or Python file each, discovered automatically.

A YAML recipe::

    name: faq_example
    category: faq
    stage: finetune
    task_type: retrieval
    language: en
    source: {format: jsonl, path: "raw/*.jsonl"}
    fields: {query: question, pos: answer}
    instruction: "Given a question, retrieve the answer that addresses it"

A Python recipe defines ``RECIPE = Recipe(...)`` and optionally ``to_row(raw) -> dict | None``.
Recipe folders: the built-in ``data_recipes/``, then ``KALM_RECIPES_PATH`` (``os.pathsep``-separated),
then ``--recipes-dir``. Names must be unique across all folders. :func:`discover` returns a
:class:`RecipeSet`: a broken file is reported and left out, and only commands that need it fail.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable, ItemsView, Iterator, Sequence, ValuesView
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kalm.core.config import REPO_ROOT, StrictModel, load_model, read_yaml
from kalm.core.errors import KalmError

BUILTIN_RECIPES_DIR = REPO_ROOT / "data_recipes"
RECIPE_SUFFIXES = (".yaml", ".yml", ".py")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")

# Canonical targets a source field can map to.
TARGETS = ("query", "pos", "neg", "instruction", "text", "label", "score")
SourceFormat = Literal["jsonl", "parquet", "csv", "hf", "python_ast", "pkg_metadata"]
Stage = Literal["pretrain", "finetune"]
TaskType = Literal[
    "retrieval", "sts", "classification", "clustering", "pair_classification", "reranking", "bitext"
]
RowAdapter = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class SourceSpec(StrictModel):
    """Where the raw records come from.

    ``path``: a glob relative to the recipe file, an absolute path/glob, ``s3://...``, or for ``hf`` a hub
    id or a local folder in the hub layout. ``python_ast`` reads functions with docstrings from ``.py`` files
    (``{stdlib}`` expands to this Python's standard library); ``pkg_metadata`` reads the metadata of the
    installed Python distributions (``path`` is a glob over distribution names, ``*`` for all).
    """

    format: SourceFormat
    path: str
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    delimiter: str = ","

    @field_validator("path")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        from kalm.core.secrets import scrub

        if scrub(v) != v:  # the message is scrubbed: pydantic echoes the value otherwise
            raise ValueError(
                f"{scrub(v)}: credentials in a source URL are refused (they would be stored in manifests); "
                "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or HF_TOKEN"
            )
        return v


class FilterSpec(StrictModel):
    """Length filters in characters, after normalisation. ``truncate_chars`` cuts documents first."""

    min_query_chars: int = Field(3, ge=0)
    min_doc_chars: int = Field(3, ge=0)
    max_query_chars: int = Field(2048, ge=1)
    max_doc_chars: int = Field(8192, ge=1)
    truncate_chars: int | None = Field(None, ge=1)
    keep_newlines: bool = False


class Recipe(StrictModel):
    """One category source. Frozen; validated on load (unknown keys are errors)."""

    name: str
    category: str
    stage: Stage
    task_type: TaskType
    language: str = "en"
    source: SourceSpec
    fields: dict[str, str] = Field(default_factory=dict)
    instruction: str = ""
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    samples: str | None = None
    filters: FilterSpec = Field(default_factory=FilterSpec)
    max_rows: int | None = Field(None, ge=1)
    negatives_per_row: int = Field(7, ge=0)
    min_score: float | None = None
    keep_labels: list[str] | None = None
    seed: int = 0
    holdout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use lowercase letters, digits, '_' and '-'")
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        """Accept ``{canonical: source_field}`` (the documented form) or ``{source_field: canonical}``."""
        if not v:
            return v
        if set(v) <= set(TARGETS):
            return dict(v)
        if set(v.values()) <= set(TARGETS):
            return {canon: src for src, canon in v.items()}
        bad = sorted(set(v) - set(TARGETS))
        raise ValueError(f"unknown canonical column(s) {bad} (allowed: {', '.join(TARGETS)})")

    @model_validator(mode="after")
    def _needs(self) -> Recipe:
        if not self.fields:
            return self  # a Python recipe's to_row produces canonical rows itself
        if self.task_type in ("classification", "clustering"):
            if "text" not in self.fields or "label" not in self.fields:
                raise ValueError(f"a {self.task_type} recipe maps 'text' and 'label' in fields")
        elif "query" not in self.fields or "pos" not in self.fields:
            raise ValueError("fields must map 'query' and 'pos'")
        return self

    @property
    def label_based(self) -> bool:
        """Classification/clustering sources become pairs by label (positive: same label)."""
        return self.task_type in ("classification", "clustering")


@dataclass(frozen=True)
class LoadedRecipe:
    """A recipe plus where it came from; ``fingerprint`` changes when the recipe file changes."""

    recipe: Recipe
    path: Path
    fingerprint: str
    to_row: RowAdapter | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def dir(self) -> Path:
        return self.path.parent

    def sample_path(self) -> Path:
        """The committed sample file (or folder, for ``hf``) the contract test and ``data check`` use."""
        if self.recipe.samples:
            return (self.dir / self.recipe.samples).resolve()
        src = self.recipe.source
        if src.format == "hf":
            return self.dir / "samples" / self.name
        ext = {"python_ast": "jsonl", "pkg_metadata": "jsonl"}.get(src.format, src.format)
        return self.dir / "samples" / f"{self.name}.{ext}"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_recipe_file(path: Path) -> LoadedRecipe:
    """Load one recipe file, raising a one-line KalmError naming the file on any problem."""
    if path.suffix in (".yaml", ".yml"):
        from_yaml = load_model(Recipe, read_yaml(path), str(path))
        return LoadedRecipe(recipe=from_yaml, path=path, fingerprint=_file_hash(path))
    spec = importlib.util.spec_from_file_location(f"kalm_recipe_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise KalmError(f"{path}: cannot import")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except KalmError:
        raise
    except Exception as err:  # a broken recipe file must not crash discovery with a traceback
        raise KalmError(f"{path}: failed to import: {type(err).__name__}: {err}") from None
    recipe_obj = getattr(module, "RECIPE", None)
    if not isinstance(recipe_obj, Recipe):
        raise KalmError(f"{path}: a Python recipe defines RECIPE = Recipe(...)")
    recipe: Recipe = recipe_obj
    to_row = getattr(module, "to_row", None)
    if to_row is not None and not callable(to_row):
        raise KalmError(f"{path}: to_row must be a function")
    if to_row is None and not recipe.fields:
        raise KalmError(f"{path}: define fields or a to_row adapter")
    return LoadedRecipe(recipe=recipe, path=path, fingerprint=_file_hash(path), to_row=to_row)


def recipe_dirs(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The built-in folder, then ``KALM_RECIPES_PATH``, then ``extra`` (``--recipes-dir``)."""
    dirs = [BUILTIN_RECIPES_DIR]
    env = os.environ.get("KALM_RECIPES_PATH", "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path(p) for p in extra]
    out: list[Path] = []
    for d in dirs:
        d = d.expanduser().resolve()
        if not d.is_dir():
            raise KalmError(f"recipes folder not found: {d}")
        if d not in out:
            out.append(d)
    return out


def recipe_files(dirs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        files += sorted(
            p for p in d.iterdir() if p.suffix in RECIPE_SUFFIXES and not p.name.startswith(("_", "."))
        )
    return files


@dataclass(frozen=True)
class RecipeSet:
    """Every recipe found in the recipe folders, discovered once per command.

    A broken file (invalid YAML, unknown key, failing import) or a name defined twice does not stop the
    others: it is in ``broken`` (path -> one-line error) and excluded, and only asking for that recipe fails
    (:meth:`get`), naming the file and its error.
    """

    recipes: dict[str, LoadedRecipe]
    broken: dict[str, str]  # file path -> one-line error
    broken_names: dict[str, str]  # recipe name (or file stem) -> the file's error

    def __contains__(self, name: object) -> bool:
        return name in self.recipes

    def __iter__(self) -> Iterator[str]:
        return iter(self.recipes)

    def __len__(self) -> int:
        return len(self.recipes)

    def __getitem__(self, name: str) -> LoadedRecipe:
        return self.get(name)

    def items(self) -> ItemsView[str, LoadedRecipe]:
        return self.recipes.items()

    def values(self) -> ValuesView[LoadedRecipe]:
        return self.recipes.values()

    def problems(self, except_names: Sequence[str] = ()) -> list[str]:
        """One line per broken file, e.g. to print as warnings; files claiming ``except_names`` are left
        out (asking for those fails with their error anyway)."""
        skip = {self.broken_names[n] for n in except_names if n in self.broken_names}
        return [f"recipe skipped: {err}" for err in self.broken.values() if err not in skip]

    def get(self, name: str) -> LoadedRecipe:
        """The recipe, or a one-line KalmError: its file is broken (path and error), or the name is unknown
        (with close matches)."""
        if name in self.recipes:
            return self.recipes[name]
        if name in self.broken_names:
            raise KalmError(f"recipe {name!r} cannot be used: {self.broken_names[name]}")
        import difflib

        close = difflib.get_close_matches(name, list(self.recipes), n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise KalmError(f"unknown recipe {name!r}{hint}; `kalm data list` shows all {len(self.recipes)}")

    def select(
        self,
        names: Sequence[str] | None = None,
        tags: Sequence[str] | None = None,
        stages: Sequence[str] | None = None,
    ) -> list[LoadedRecipe]:
        """Recipes by name (each must exist: :meth:`get`), then filtered by tag and stage; sorted by name."""
        pool = [self.get(n) for n in dict.fromkeys(names)] if names else list(self.recipes.values())
        return sorted(
            (
                lr
                for lr in pool
                if (not tags or set(tags) & set(lr.recipe.tags)) and (not stages or lr.recipe.stage in stages)
            ),
            key=lambda lr: lr.name,
        )


_discovered: dict[tuple[Any, ...], RecipeSet] = {}


def _claimed_name(path: Path) -> str:
    """The name a (possibly broken) recipe file is meant to define: its YAML ``name``, else the file stem."""
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                return str(data["name"])
        except Exception:  # the file's own error is reported instead
            pass
    return path.stem


def discover(extra_dirs: Sequence[str | Path] = ()) -> RecipeSet:
    """All recipes of the built-in folder, ``KALM_RECIPES_PATH`` and ``extra_dirs``.

    Broken files are excluded and listed in ``broken`` (callers report them: :meth:`RecipeSet.problems`).
    Memoised per process on the files' paths,
    sizes and mtimes: a command that resolves recipes in several places discovers (imports) them once.
    A missing recipes folder is a one-line KalmError.
    """
    files = recipe_files(recipe_dirs(extra_dirs))
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp in _discovered:
        return _discovered[stamp]
    found: dict[str, LoadedRecipe] = {}
    broken: dict[str, str] = {}
    broken_names: dict[str, str] = {}
    defined: dict[str, Path] = {}
    for path in files:
        try:
            lr = load_recipe_file(path)
        except KalmError as err:
            broken[str(path)] = str(err)
            broken_names[_claimed_name(path)] = str(err)
            continue
        if lr.name in found or lr.name in defined:  # ambiguous: every file defining it is left out
            first = found.pop(lr.name).path if lr.name in found else defined[lr.name]
            msg = f"recipe name {lr.name!r} is defined twice: {first} and {path}"
            broken[str(path)] = msg
            broken_names[lr.name] = msg
            continue
        found[lr.name] = lr
        defined[lr.name] = path
    out = RecipeSet(found, broken, broken_names)
    _discovered[stamp] = out
    return out


def get_recipe(name: str, extra_dirs: Sequence[str | Path] = ()) -> LoadedRecipe:
    """One recipe by name (see :meth:`RecipeSet.get`)."""
    return discover(extra_dirs).get(name)
