"""Split one recipe's source into partitions a worker reads alone, and read one partition's records.

A partition is planned from the *sorted* input listing and the configured size only, never from the
cluster, so the same source always gives the same partitions (and rows the same keys):

- uncompressed JSONL: byte ranges of about ``target_bytes``; a range owns every line that *starts*
  inside it (a reader seeks to ``start - 1`` and skips to the next line end), so no line is read twice
  or lost, whatever the boundaries;
- Parquet: runs of whole row groups of about ``target_bytes`` (uncompressed);
- everything else (compressed files, CSV, whose quoted fields may span lines, Python files, installed
  package metadata, hub datasets): one partition per file, or one for the whole source.

>>> Partition(0, "a.jsonl", "bytes", 0, 100).label
'p00000'
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kalm.core.errors import KalmError
from kalm.data.readers import (
    BOM,
    Record,
    iter_records,
    parse_jsonl_lines,
    read_csv,
    read_jsonl,
    read_python_ast,
    resolve_files,
)
from kalm.data.recipes import LoadedRecipe

log = logging.getLogger(__name__)
Kind = Literal["bytes", "row_groups", "file", "source"]
UNCOMPRESSED_JSONL = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Partition:
    index: int
    path: str  # the file ("" for a whole-source partition)
    kind: Kind
    start: int = 0  # byte offset, or first row group
    end: int = 0  # byte offset (exclusive), or row group after the last

    @property
    def label(self) -> str:
        return f"p{self.index:05d}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_partitions(lr: LoadedRecipe, target_bytes: int) -> list[Partition]:
    """The partitions of a recipe's source. A recipe with ``max_rows`` (the first N rows in source order)
    or a label-based one (texts paired across the whole recipe) is one partition."""
    spec = lr.recipe.source
    if lr.recipe.max_rows is not None or lr.recipe.label_based or spec.format in ("hf", "pkg_metadata"):
        return [Partition(0, "", "source")]
    fs, files = resolve_files(spec, lr.dir)
    parts: list[Partition] = []
    infos = fs.get_file_info(files)
    for path, info in zip(files, infos, strict=True):
        if spec.format == "jsonl" and path.endswith(UNCOMPRESSED_JSONL):
            for start in range(0, max(info.size, 1), target_bytes):
                parts.append(
                    Partition(len(parts), path, "bytes", start, min(info.size, start + target_bytes))
                )
        elif spec.format == "parquet":
            try:
                with fs.open_input_file(path) as f:
                    md = pq.ParquetFile(f).metadata
            except (OSError, ValueError) as err:
                raise KalmError(f"cannot read Parquet file {path}: {err}") from None
            first, size = 0, 0
            for g in range(md.num_row_groups):
                size += md.row_group(g).total_byte_size
                if size >= target_bytes or g == md.num_row_groups - 1:
                    parts.append(Partition(len(parts), path, "row_groups", first, g + 1))
                    first, size = g + 1, 0
            if md.num_row_groups == 0:
                parts.append(Partition(len(parts), path, "row_groups", 0, 0))
        else:
            parts.append(Partition(len(parts), path, "file"))
    return parts


def read_partition(lr: LoadedRecipe, part: Partition, stats: Counter[str]) -> Iterator[Record]:
    """Raw records of one partition (bad records counted in ``stats`` and skipped, as the readers do)."""
    spec = lr.recipe.source
    if part.kind == "source":
        yield from iter_records(spec, lr.dir, stats)
        return
    fs = resolve_files(spec, lr.dir)[0] if part.path.startswith("s3://") else pafs.LocalFileSystem()
    if part.kind == "bytes":
        yield from parse_jsonl_lines(_range_lines(fs, part), part.path, stats)
    elif part.kind == "row_groups":
        with fs.open_input_file(part.path) as f:
            pf = pq.ParquetFile(f)
            for g in range(part.start, part.end):
                yield from pf.read_row_group(g).to_pylist()
    elif spec.format == "csv":
        yield from read_csv(fs, [part.path], stats, spec.delimiter)
    elif spec.format == "jsonl":
        yield from read_jsonl(fs, [part.path], stats)
    else:
        yield from read_python_ast([part.path], stats)


def _first_line_start(f: Any, pos: int, size: int, block: int = 1 << 16) -> int:
    """The offset just after the first newline at or after ``pos`` (``size`` if there is none)."""
    f.seek(pos)
    while pos < size:
        chunk = f.read(min(block, size - pos))
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(chunk)
    return size


def range_bytes(fs: pafs.FileSystem, part: Partition) -> bytes:
    """The bytes of the lines that start in ``[start, end)`` (a UTF-8 BOM at the file's start removed):
    the partial line at ``start`` belongs to the range before, the line running past ``end`` to this one."""
    with fs.open_input_file(part.path) as f:
        size = f.size()
        lo = 0 if part.start == 0 else _first_line_start(f, part.start - 1, size)
        hi = 0 if part.end == 0 else _first_line_start(f, part.end - 1, size)
        if lo >= hi:
            return b""
        f.seek(lo)
        data = bytes(f.read(hi - lo))
    return data[len(BOM) :] if lo == 0 and data.startswith(BOM) else data


def _range_lines(fs: pafs.FileSystem, part: Partition) -> Iterator[bytes]:
    yield from io.BytesIO(range_bytes(fs, part))
