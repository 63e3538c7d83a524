"""A held-out general suite: local tasks of every kind built from text no recipe trains on, so a regression
outside the training domain shows in the demo's own table (issue #11).

The demo trains on Python code, stdlib docstrings and PyPI package metadata. These tasks use other text
found on any Debian/Ubuntu machine with Python (each task is left out, with a warning, where its source is
missing):

- ``ManPageRetrieval`` (retrieval): man page one-line summaries -> the page's description (sections 1, 5,
  7, 8 of ``/usr/share/man``, parsed from the roff source);
- ``DebianPackagePairs`` (pair classification): does a Debian package's short description match a long
  description (its own or another's, from ``/var/lib/dpkg/status``)?
- ``PythonReferenceClustering`` (clustering): paragraphs of the Python language reference
  (``pydoc_data.topics``) by topic;
- ``MtebDescriptionClustering`` (clustering): descriptions of the installed mteb's datasets by task type;
- ``ManPageSectionClassification`` (classification): man page descriptions -> manual section.

Every choice is a stable hash of the text (no RNG state), so a machine builds the same tasks each time;
data goes to ``<root>/eval_data/general/<task>/data.parquet`` with a manifest of its parameters, rebuilt only
when they change. The demo's decontamination runs against these texts too.

>>> specs = build_general_suite(DataRoot.from_uri("./data"))          # doctest: +SKIP
>>> sorted(s.type for s in specs)
['classification', 'clustering', 'clustering', 'pair_classification', 'retrieval']
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from kalm.core.layout import MANIFEST, eval_data_dir
from kalm.core.storage import DataRoot
from kalm.data.normalize import normalize_text
from kalm.evaluation.config import LocalTaskSpec

log = logging.getLogger(__name__)

SUITE_VERSION = 2  # 2: the classification task cross-validated over all its texts
MAN_DIR = Path("/usr/share/man")
DPKG_STATUS = Path("/var/lib/dpkg/status")
MAN_SECTIONS = ("1", "5", "7", "8")  # user commands, file formats, overviews, administration


def _rank(text: str, salt: str = "") -> str:
    """A stable pseudo-random sort key of a text."""
    return hashlib.blake2b(f"{salt}\x1f{text}".encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


# -- sources ----------------------------------------------------------------------------------------------
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\(em|\\\(en"), "-"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^~ ,/0]"), " "),
    (re.compile(r'\\".*$'), ""),  # comments
    (re.compile(r"\\\*\(..|\\\*."), ""),
    (re.compile(r"\\s[-+]?\d"), ""),  # size changes
]
_TEXT_MACROS = re.compile(r"^\.(B|I|BR|RB|IR|RI|BI|IB|SM|SB)\s+(.*)$")


def _roff_text(line: str) -> str:
    for pattern, repl in _ESCAPES:
        line = pattern.sub(repl, line)  # type: ignore[call-overload]
    return line.replace('"', "").strip()


def man_pages(
    root: Path = MAN_DIR, sections: tuple[str, ...] = MAN_SECTIONS, per_section: int = 1500
) -> Iterator[dict[str, str]]:
    """``{name, section, summary, description}`` of readable man pages: up to ``per_section`` files per
    section, chosen by a stable hash of their names, parsed from the roff source (no ``man`` needed); pages
    without a NAME summary or a 60-700 character description are skipped."""
    for sec in sections:
        folder = root / f"man{sec}"
        if not folder.is_dir():
            continue
        files = sorted(folder.glob("*.gz"), key=lambda f: _rank(f.name, "man"))[:per_section]
        for path in sorted(files):
            try:
                raw = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
            except (OSError, EOFError):
                continue
            if raw.startswith(".so "):  # a link to another page
                continue
            page = _parse_man(raw)
            if page is not None:
                yield {**page, "section": sec, "name": path.name.split(".")[0]}


def _parse_man(raw: str) -> dict[str, str] | None:
    sections: dict[str, list[str]] = defaultdict(list)
    current = ""
    for line in raw.splitlines():
        if line.startswith((".SH", ".Sh")):
            current = _roff_text(line[3:]).upper()
            continue
        if line.startswith((".PP", ".LP", ".P ", ".TP", ".IP", ".sp", ".br")) or line.strip() == ".P":
            sections[current].append("\n")
            continue
        m = _TEXT_MACROS.match(line)
        if m:
            line = m.group(2)
        elif line.startswith((".", "'")):
            continue
        text = _roff_text(line)
        if text:
            sections[current].append(text)
    name = " ".join(t for t in sections.get("NAME", []) if t != "\n")
    if " - " not in name:
        return None
    summary = normalize_text(name.split(" - ", 1)[1])
    desc = ""
    for para in (normalize_text(p) for p in " ".join(sections.get("DESCRIPTION", [])).split("\n")):
        if para.startswith("-"):  # an option list: the prose is over
            break
        if para:
            desc = f"{desc} {para}".strip()
        if len(desc) >= 60:
            break
    if not summary or len(summary) < 8 or not 60 <= len(desc) <= 700:
        return None
    return {"summary": summary, "description": desc}


def dpkg_packages(status: Path = DPKG_STATUS) -> Iterator[dict[str, str]]:
    """``{name, section, short, long}`` of every installed Debian package with a long description."""
    if not status.is_file():
        return
    for block in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith(" ") and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        desc = fields.get("Description", "")
        short, _, rest = desc.partition("\n")
        long = normalize_text(" ".join(x for x in rest.splitlines() if x.strip() != "."))
        if short and len(long) >= 60:
            yield {
                "name": fields.get("Package", ""),
                "section": fields.get("Section", ""),
                "short": short,
                "long": long[:700],
            }


def python_reference() -> dict[str, list[str]]:
    """Paragraphs (150-900 characters) of the Python language reference shipped with the interpreter
    (``pydoc_data.topics``), by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    out: dict[str, list[str]] = {}
    for topic, text in topics.items():
        paras = [normalize_text(p) for p in re.split(r"\n\s*\n", text)]
        out[topic] = [p for p in paras if 150 <= len(p) <= 900 and not p.startswith(("*", "+", "|", ">>>"))]
    return out


def mteb_descriptions() -> dict[str, list[str]]:
    """Descriptions of the installed mteb's English text tasks, by task type (distinct, 60+ characters)."""
    import warnings

    import mteb

    out: dict[str, set[str]] = defaultdict(set)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for task in mteb.get_tasks(languages=["eng"], exclude_superseded=False):
            md = task.metadata
            desc = normalize_text(str(md.description or ""))
            if len(desc) >= 60 and set(md.modalities or ["text"]) <= {"text"}:
                out[str(md.type)].add(desc)
    return {k: sorted(v) for k, v in out.items()}


# -- tasks ------------------------------------------------------------------------------------------------
def _by_label(
    items: dict[str, list[str]], per_label: int, max_labels: int, min_per_label: int
) -> list[tuple[str, str]]:
    """(text, label) pairs: the largest labels with enough distinct texts, ``per_label`` each (stable)."""
    seen: set[str] = set()
    clean: dict[str, list[str]] = {}
    for label, texts in sorted(items.items()):
        keep = [t for t in sorted(set(texts), key=_rank) if t not in seen]
        seen.update(keep)
        if len(keep) >= min_per_label:
            clean[label] = keep[:per_label]
    labels = sorted(clean, key=lambda k: (-len(clean[k]), k))[:max_labels]
    return [(t, lab) for lab in sorted(labels) for t in clean[lab]]


def man_retrieval(pages: list[dict[str, str]], n: int) -> dict[str, list[Any]] | None:
    rows = sorted({p["summary"]: p for p in pages}.values(), key=lambda p: _rank(p["summary"], "ret"))[:n]
    if len(rows) < 50:
        return None
    return {"query": [r["summary"] for r in rows], "pos": [[r["description"]] for r in rows]}


def dpkg_pairs(pkgs: list[dict[str, str]], n: int) -> dict[str, list[Any]] | None:
    pkgs = sorted({p["short"]: p for p in pkgs}.values(), key=lambda p: _rank(p["name"], "pair"))[:n]
    if len(pkgs) < 40:
        return None
    s1, s2, lab = [], [], []
    for i, p in enumerate(pkgs):
        other = pkgs[(i + 1 + int(_rank(p["name"], "shift"), 16) % (len(pkgs) - 1)) % len(pkgs)]
        match = int(_rank(p["name"], "match"), 16) % 2 == 0
        s1.append(p["short"])
        s2.append(p["long"] if match else other["long"])
        lab.append(1 if match else 0)
    return {"sentence1": s1, "sentence2": s2, "label": lab}


def clustering(pairs: list[tuple[str, str]]) -> dict[str, list[Any]] | None:
    if len({lab for _, lab in pairs}) < 3:
        return None
    return {"text": [t for t, _ in pairs], "label": [lab for _, lab in pairs]}


def classification(pairs: list[tuple[str, str]]) -> dict[str, list[Any]] | None:
    """No split column: the task is scored by cross-validation over every text (local_tasks)."""
    if len({lab for _, lab in pairs}) < 2:
        return None
    return {"text": [t for t, _ in pairs], "label": [lab for _, lab in pairs]}


SUITE: dict[str, tuple[str, str, str]] = {  # name -> (type, instruction, description)
    "ManPageRetrieval": (
        "retrieval",
        "Given the one-line summary of a Unix command or file, retrieve its manual page description",
        "Man page NAME summaries -> their first DESCRIPTION paragraph (sections 1, 5, 7, 8)",
    ),
    "DebianPackagePairs": (
        "pair_classification",
        "Retrieve the long description of a software package that matches its short description",
        "Debian package short description vs a long description: its own or another package's",
    ),
    "PythonReferenceClustering": (
        "clustering",
        "Identify the topic of a paragraph from a programming language reference manual",
        "Paragraphs of the Python language reference (pydoc_data.topics), labelled by topic",
    ),
    "MtebDescriptionClustering": (
        "clustering",
        "Identify the kind of benchmark task a dataset description is about",
        "Descriptions of MTEB datasets, labelled by task type (retrieval, classification, ...)",
    ),
    "ManPageSectionClassification": (
        "classification",
        "Classify a manual page description into its manual section",
        "Man page descriptions labelled by section: commands, file formats, overviews, administration",
    ),
}


def build_general_suite(
    out: DataRoot, rel: str = eval_data_dir("general"), *, size: int = 400, force: bool = False
) -> list[LocalTaskSpec]:
    """Write the suite's tasks under ``<out>/<rel>/<task>/data.parquet`` and return their specs.

    ``size`` bounds each task (queries, pairs, texts). A task whose source is missing on this machine is
    left out with a warning; a second call with the same parameters reuses the files unless ``force``.
    """
    params = {"version": SUITE_VERSION, "size": size, "python": sys.version.split()[0]}
    manifest = f"{rel}/{MANIFEST}"
    if not force and out.exists(manifest) and out.read_json(manifest).get("params") == params:
        built = out.read_json(manifest)["tasks"]
    else:
        built = _build(out, rel, size)
        out.write_json(manifest, {"params": params, "tasks": built})
    specs = []
    for name, (kind, instruction, description) in SUITE.items():
        if name in built:
            path = out.full_uri(f"{rel}/{name}/data.parquet")
            specs.append(
                LocalTaskSpec(
                    name=name, type=kind, path=path, instruction=instruction, description=description
                )
            )
        else:
            log.warning("general suite: %s left out (its source text is not on this machine)", name)
    return specs


def _diverse(pages: list[dict[str, str]], per_family: int = 2) -> list[dict[str, str]]:
    """At most ``per_family`` pages per command family (``gcloud_*``, ``git-*``, ...) and one per summary:
    a suite, not a tour of the one tool that ships thousands of pages."""
    by_family: dict[str, list[dict[str, str]]] = defaultdict(list)
    for p in sorted({p["summary"]: p for p in pages}.values(), key=lambda p: _rank(p["name"], "family")):
        family = re.split(r"[_\-.]", p["name"].lower())[0]
        if len(by_family[family]) < per_family:
            by_family[family].append(p)
    return [p for ps in by_family.values() for p in ps]


def _build(out: DataRoot, rel: str, size: int) -> dict[str, int]:
    pages = _diverse(list(man_pages()))
    per_section: dict[str, list[str]] = defaultdict(list)
    for p in pages:
        per_section[p["section"]].append(p["description"])
    builders: dict[str, Callable[[], dict[str, list[Any]] | None]] = {
        "ManPageRetrieval": lambda: man_retrieval(pages, size),
        "DebianPackagePairs": lambda: dpkg_pairs(list(dpkg_packages()), size),
        "PythonReferenceClustering": lambda: clustering(_by_label(python_reference(), 8, 24, 5)),
        "MtebDescriptionClustering": lambda: clustering(_by_label(mteb_descriptions(), size // 8, 8, 10)),
        "ManPageSectionClassification": lambda: classification(
            _by_label(dict(per_section), size // 4, 4, 40)
        ),
    }
    built: dict[str, int] = {}
    for name, make in builders.items():
        data = make()
        if data is None:
            continue
        table = pa.table(data)
        out.write_parquet(f"{rel}/{name}/data.parquet", table)
        built[name] = table.num_rows
        log.info("general suite: %s, %d rows", name, table.num_rows)
    return built
