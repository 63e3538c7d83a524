"""Source readers: one generator per source format, yielding raw records (dicts).

Bad records never stop a read: each is counted in ``stats`` by reason and skipped (malformed JSON,
invalid UTF-8, a CSV row with too many fields). An unreadable or missing source is a one-line KalmError.
Every reader streams, so a source larger than memory works.
"""

from __future__ import annotations

import ast
import bz2
import csv
import fnmatch
import glob
import gzip
import io
import json
import logging
import os
import re
import sysconfig
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kalm.core.config import HF_OFFLINE_VARS, hf_offline
from kalm.core.errors import KalmError
from kalm.core.storage import s3_filesystem
from kalm.data.normalize import has_invalid_unicode
from kalm.data.recipes import SourceSpec

log = logging.getLogger(__name__)
Record = dict[str, Any]
SELF_DISTRIBUTION = "kalm-pipeline"  # never a training source of itself (pkg_metadata)


def _expand(path: str) -> str:
    return path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])


def resolve_files(spec: SourceSpec, base_dir: Path) -> tuple[pafs.FileSystem, list[str]]:
    """Expand the source glob to concrete files (sorted), locally or on S3."""
    path = _expand(spec.path)
    if path.startswith("s3://"):
        fs: pafs.FileSystem = s3_filesystem()
        bare = path[len("s3://") :]
        prefix = bare.split("*", 1)[0].rsplit("/", 1)[0]
        try:
            infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        except OSError as err:
            raise KalmError(f"cannot list {path}: {err}") from None
        files = sorted(i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, bare))
    else:
        fs = pafs.LocalFileSystem()
        p = Path(path)
        pattern = str(p if p.is_absolute() else (base_dir / p))
        files = sorted(f for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
    if not files:
        raise KalmError(f"no files match source path {spec.path!r} (resolved: {path})")
    return fs, files


def source_fingerprint(spec: SourceSpec, base_dir: Path) -> list[Any]:
    """What identifies the source's content cheaply: (file, size, mtime) for files, id+revision for hub."""
    if spec.format == "hf" and not Path(_expand(spec.path)).exists() and not spec.path.startswith("."):
        return [spec.path, spec.subset, spec.split, spec.revision]
    if spec.format == "pkg_metadata":
        from importlib import metadata

        return sorted(
            f"{d.metadata['Name']}=={d.version}"
            for d in metadata.distributions()
            if fnmatch.fnmatch(str(d.metadata["Name"] or "").lower(), spec.path.lower())
            and str(d.metadata["Name"] or "").lower() != SELF_DISTRIBUTION
        )
    if spec.format == "hf":
        base = Path(_expand(spec.path))
        base = base if base.is_absolute() else base_dir / base
        files = sorted(str(f) for f in base.rglob("*") if f.is_file())
        return [[f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
    fs, files = resolve_files(spec, base_dir)
    infos = fs.get_file_info(files)
    return [[i.path, i.size, i.mtime_ns] for i in infos]


BOM = b"\xef\xbb\xbf"
MAX_CSV_RECORD_LINES = 10_000  # a quoted field spanning more physical lines is taken as an unclosed quote


def _open_text_lines(fs: pafs.FileSystem, path: str, stats: Counter[str] | None = None) -> Iterator[bytes]:
    """The file's lines (bytes), a UTF-8 byte-order mark removed from the first. A compressed file that is
    cut short (or corrupt) ends the read there: the lines before it are kept, ``truncated_file`` counted."""
    try:
        # gzip/bz2 through Python's own decoders: they hand out every line before a cut-off end, where
        # pyarrow's decoders fail the whole buffered block; other codecs (zstd, lz4) through pyarrow
        compressed = path.endswith((".gz", ".bz2"))
        stream = fs.open_input_stream(path, compression=None if compressed else "detect")
    except (OSError, ValueError) as err:
        raise KalmError(f"cannot open {path}: {err}") from None
    with stream:
        raw: Any = io.BufferedReader(stream, buffer_size=1 << 20)  # type: ignore[arg-type]
        if path.endswith(".gz"):
            raw = gzip.GzipFile(fileobj=raw)
        elif path.endswith(".bz2"):
            raw = bz2.BZ2File(raw)
        lines = iter(raw)
        first = True
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, ValueError) as err:  # gzip/zstd: truncated or corrupt stream
                if stats is not None:
                    stats["truncated_file"] += 1
                log.warning("%s: unreadable from here on (%s); the lines before it are kept", path, err)
                return
            if first:
                first = False
                if line.startswith(BOM):
                    line = line[len(BOM) :]
            yield line


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only such an escape can decode to a lone surrogate


def _no_invalid_unicode(obj: Any, depth: int = 0) -> bool:
    """No lone surrogate in any string of a decoded JSON value (a ``\\ud800`` escape decodes to one)."""
    if isinstance(obj, str):
        return not has_invalid_unicode(obj)
    if depth > 64:
        return True  # json.loads already bounded the nesting; don't recurse without end
    if isinstance(obj, dict):
        return all(
            _no_invalid_unicode(k, depth + 1) and _no_invalid_unicode(v, depth + 1) for k, v in obj.items()
        )
    if isinstance(obj, list):
        return all(_no_invalid_unicode(v, depth + 1) for v in obj)
    return True


def read_jsonl(fs: pafs.FileSystem, files: list[str], stats: Counter[str]) -> Iterator[Record]:
    for path in files:
        yield from parse_jsonl_lines(_open_text_lines(fs, path, stats), path, stats)


def parse_jsonl_lines(lines: Iterator[bytes], path: str, stats: Counter[str]) -> Iterator[Record]:
    """JSON objects of ``lines`` (bytes, BOM already removed); bad lines counted by reason and skipped."""
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["invalid_utf8_line"] += 1
            log.warning("%s:%d: invalid UTF-8, skipped", path, lineno)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            stats["malformed_json"] += 1
            log.warning("%s:%d: malformed JSON (%s), skipped", path, lineno, err.msg)
            continue
        except RecursionError:
            stats["malformed_json"] += 1
            log.warning("%s:%d: JSON nested too deeply, skipped", path, lineno)
            continue
        if not isinstance(rec, dict):
            stats["not_an_object"] += 1
            continue
        if _SURROGATE_ESCAPE.search(raw) and not _no_invalid_unicode(rec):
            stats["invalid_utf8_line"] += 1
            log.warning("%s:%d: a lone surrogate in a string, skipped", path, lineno)
            continue
        yield rec


def _csv_rows(lines: Iterator[str], delimiter: str, path: str, stats: Counter[str]) -> Iterator[list[str]]:
    """CSV records, one at a time, that never let one bad quote swallow the rest of the file.

    A record may span lines (a quoted field with newlines). Lines are gathered until the csv module parses
    them as one complete record; a line without a quote character cannot close an open quote, so only those
    trigger a re-parse. A record still open at the end of the file or after ``MAX_CSV_RECORD_LINES`` lines
    (an unclosed quote), or one the csv module rejects, costs only its FIRST line (counted as
    ``malformed_csv``): the lines after it are read again as records of their own.
    """
    pending: list[str] = []  # lines to read again, in order (a stack: last element is read first)
    src = iter(lines)

    def next_line() -> str | None:
        if pending:
            return pending.pop()
        return next(src, None)

    while True:
        line = next_line()
        if line is None:
            return
        buf = [line]
        while True:
            text = "".join(buf)
            if len(buf) > 1 and '"' not in buf[-1]:
                complete = None  # cannot have closed the quote: read on
            else:
                try:
                    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter, strict=True))
                    complete = True
                except csv.Error as err:
                    complete = None if "unexpected end of data" in str(err) else False
            if complete is None and len(buf) < MAX_CSV_RECORD_LINES:
                more = next_line()
                if more is not None:
                    buf.append(more)
                    continue
            if complete:
                if rows:
                    yield rows[0]
                break
            stats["malformed_csv"] += 1
            log.warning("%s: malformed CSV record (an unclosed or stray quote?), one line skipped", path)
            pending.extend(reversed(buf[1:]))
            break


def read_csv(fs: pafs.FileSystem, files: list[str], stats: Counter[str], delimiter: str) -> Iterator[Record]:
    for path in files:
        text = (raw.decode("utf-8", errors="surrogateescape") for raw in _open_text_lines(fs, path, stats))
        rows = _csv_rows(text, delimiter, path, stats)
        header = next(rows, None)
        if header is None:
            continue
        header = [h.strip() for h in header]
        for row in rows:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) > len(header):  # more fields than the header
                stats["malformed_csv"] += 1
                continue
            if any(has_invalid_unicode(v) for v in row):
                stats["invalid_utf8_line"] += 1
                continue
            rec: Record = dict(zip(header, row, strict=False))
            for name in header[len(row) :]:
                rec[name] = None  # fewer fields than the header: missing (as csv.DictReader does)
            yield rec


def read_parquet(fs: pafs.FileSystem, files: list[str], stats: Counter[str]) -> Iterator[Record]:
    for path in files:
        try:
            f = fs.open_input_file(path)
            pf = pq.ParquetFile(f)
        except (OSError, ValueError) as err:
            raise KalmError(f"cannot read Parquet file {path}: {err}") from None
        with f:
            for batch in pf.iter_batches(batch_size=8192):
                yield from batch.to_pylist()


def read_hf(spec: SourceSpec, base_dir: Path, path_override: Path | None) -> Iterator[Record]:
    """A hub dataset through ``datasets`` in streaming mode; a local folder in the hub layout works too, and
    so does a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (memory-mapped)."""
    import datasets

    target = str(path_override) if path_override else _expand(spec.path)
    local = Path(target) if Path(target).is_absolute() else base_dir / target
    if local.exists():
        target = str(local)
        if saved_to_disk(local):
            yield from _read_saved(local, spec)
            return
    try:
        ds = datasets.load_dataset(
            target, name=spec.subset, split=spec.split, streaming=True, revision=spec.revision
        )
        yield from ds
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise KalmError(f"cannot load dataset {target!r} split {spec.split!r}: {err}") from None
    except ConnectionError as err:  # datasets' own "Couldn't reach ... on the Hub" (also offline mode)
        raise KalmError(hub_unreachable(target, err)) from None


def hub_unreachable(target: str, err: Exception) -> str:
    """One line for a hub dataset that cannot be fetched: offline mode set, or no route to the Hub."""
    if hf_offline():
        return (
            f"hub dataset {target!r} is not in the local cache and Hugging Face offline mode is on "
            f"({'/'.join(HF_OFFLINE_VARS)}): unset it on a machine with network access, or point the "
            "recipe's path at a local copy"
        )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return (
        f"cannot reach the Hugging Face Hub ({endpoint}) for dataset {target!r}: {err}; check the network "
        "or HF_ENDPOINT, or point the recipe's path at a local copy"
    )


def saved_to_disk(folder: Path) -> bool:
    """True for a ``save_to_disk`` folder: a ``DatasetDict`` (``dataset_dict.json``) or one ``Dataset``
    (``state.json`` beside ``dataset_info.json``)."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _read_saved(folder: Path, spec: SourceSpec) -> Iterator[Record]:
    import datasets

    if spec.subset:
        raise KalmError(
            f"{folder}: a save_to_disk folder has no subsets (subset: {spec.subset!r}); point path at the "
            "subset's own folder"
        )
    try:
        ds = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise KalmError(f"cannot read the save_to_disk folder {folder}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise KalmError(f"{folder}: no split {spec.split!r} (it has: {', '.join(sorted(ds))})")
        ds = ds[spec.split]
    yield from ds


_AST_LOCK = threading.Lock()


def parse_python(src: str) -> ast.Module:
    """``ast.parse`` under a lock: 3.11's parser is not thread-safe (concurrent ingest tasks run in threads
    and failed with "SystemError: AST constructor recursion depth mismatch")."""
    with _AST_LOCK:
        return ast.parse(src)


def module_docstrings(src: str) -> list[str]:
    """Every docstring of a Python source (module, classes, functions), in walk order; [] if unparsable."""
    try:
        tree = parse_python(src)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]


def read_python_ast(files: list[str], stats: Counter[str]) -> Iterator[Record]:
    """Functions and classes that have a docstring: name, signature, docstring, code without docstring."""
    for path in files:
        try:
            src = Path(path).read_text(encoding="utf-8")
            tree = parse_python(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            stats["unparsable_file"] += 1
            continue
        module = Path(path).stem
        lines = src.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            # the body after the docstring, by line numbers (ast.get_source_segment re-splits the whole
            # file on every call, which made this reader quadratic)
            body = node.body[1:] if len(node.body) > 1 else node.body
            first, last = body[0].lineno, body[-1].end_lineno or body[-1].lineno
            code = "".join(lines[first - 1 : last])
            signature = node.name
            if not isinstance(node, ast.ClassDef):
                signature = f"{node.name}({ast.unparse(node.args)})"
            yield {
                "module": module,
                "name": node.name,
                "kind": "class" if isinstance(node, ast.ClassDef) else "function",
                "signature": signature,
                "docstring": doc,
                "summary": doc.strip().split("\n\n")[0],
                "code": code,
                "file": path,
            }


def read_pkg_metadata(pattern: str) -> Iterator[Record]:
    """Installed distributions' metadata: name, summary, description, keywords, topic classifiers."""
    from importlib import metadata

    seen: set[str] = set()
    for dist in sorted(metadata.distributions(), key=lambda d: str(d.metadata["Name"] or "")):
        md = dist.metadata
        name = str(md["Name"] or "")
        if not name or name.lower() in seen or not fnmatch.fnmatch(name.lower(), pattern.lower()):
            continue
        if (
            name.lower() == SELF_DISTRIBUTION
        ):  # our own README: training on it would change with every doc edit
            continue
        seen.add(name.lower())
        classifiers = md.get_all("Classifier") or []
        yield {
            "name": name,
            "version": dist.version,
            "summary": str(md["Summary"] or ""),
            "description": str(md.get_payload() or md["Description"] or ""),  # type: ignore[attr-defined]
            "keywords": str(md["Keywords"] or ""),
            "topics": [c.split("::")[-1].strip() for c in classifiers if c.startswith("Topic ::")],
        }


def iter_records(
    spec: SourceSpec, base_dir: Path, stats: Counter[str], path_override: Path | None = None
) -> Iterator[Record]:
    """Raw records of a source. ``path_override`` reads the committed samples instead (same layout;
    samples of ``python_ast``/``pkg_metadata`` sources are JSONL of their raw records)."""
    fmt = spec.format
    if fmt == "hf":
        yield from read_hf(spec, base_dir, path_override)
        return
    if path_override is not None:
        if not path_override.exists():
            raise KalmError(f"sample file not found: {path_override}")
        fs: pafs.FileSystem = pafs.LocalFileSystem()
        files = [str(path_override)]
        if fmt in ("python_ast", "pkg_metadata"):
            fmt = "jsonl"
    elif fmt == "pkg_metadata":
        yield from read_pkg_metadata(spec.path)
        return
    else:
        fs, files = resolve_files(spec, base_dir)
    if fmt == "jsonl":
        yield from read_jsonl(fs, files, stats)
    elif fmt == "csv":
        yield from read_csv(fs, files, stats, spec.delimiter)
    elif fmt == "parquet":
        yield from read_parquet(fs, files, stats)
    elif fmt == "python_ast":
        yield from read_python_ast(files, stats)
    else:  # pragma: no cover - SourceSpec validation rejects other formats
        raise KalmError(f"unknown source format {fmt!r}")
