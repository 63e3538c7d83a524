"""Vectorised map, normalise and filter for the common case: a YAML recipe mapping ``query`` and ``pos``
from top-level string fields of a JSONL byte range or Parquet row groups.

It must give exactly the rows (and drop counts) of the per-row path (:func:`kalm.data.ingest._pair_rows`).
So it takes only what it can prove equal: the partition is parsed by Arrow's JSON reader with an explicit
string schema (any malformed line, non-object, number in a text field, invalid UTF-8 or a ``\\ud800``-style
escape makes the whole partition take the per-row path, which counts each by reason), and rows whose query
or positive is not plain ASCII go through the per-row functions one by one (Unicode normalisation and
case folding are Python's). The rest is polars string kernels: control characters out, whitespace
collapsed, length filters, the comparison form for near dedup; ids are blake2b as in
:func:`kalm.core.schema.row_id`.

>>> fast = fast_rows(lr, part, Counter())  # doctest: +SKIP
>>> fast is None or fast.table.schema == ROW_SCHEMA  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pj
import pyarrow.parquet as pq

from kalm.core.schema import ROW_SCHEMA, SYMMETRIC_TASK_TYPES
from kalm.data.ingest import _canonical, near_text
from kalm.data.partitions import Partition, range_bytes
from kalm.data.recipes import LoadedRecipe
from kalm.data.rows import clean_row, map_record

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
CONTROL_ASCII = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # normalize.py's _CONTROL, restricted to ASCII
# whitespace runs to one space, matching only the runs that change (not every single space: ~6x faster
# than ``\s+``, same result): a space followed by more whitespace, or any other whitespace character
WS_RUN = r" \s+|[^\S ]\s*"
SPACE_RUN = r" [^\S\n]+|[^\S\n ][^\S\n]*"  # the same, newlines kept (``[^\S\n]+``)


@dataclass
class FastRows:
    table: pa.Table  # ROW_SCHEMA, in source order
    near_texts: pa.Array  # what near dedup shingles, per row (strings)


def eligible(lr: LoadedRecipe, part: Partition) -> bool:
    r = lr.recipe
    return (
        lr.to_row is None
        and not r.label_based
        and set(r.fields) == {"query", "pos"}
        and not any("." in v for v in r.fields.values())
        and r.min_score is None
        and r.keep_labels is None
        and part.kind in ("bytes", "row_groups")
    )


def _read(lr: LoadedRecipe, part: Partition, fs: pafs.FileSystem) -> pa.Table | None:
    src = list(dict.fromkeys(lr.recipe.fields.values()))
    if part.kind == "row_groups":
        with fs.open_input_file(part.path) as f:
            pf = pq.ParquetFile(f)
            if any(c not in pf.schema_arrow.names for c in src):
                return None
            t = pf.read_row_groups(list(range(part.start, part.end)), columns=src)
        if not all(pa.types.is_string(t.schema.field(c).type) for c in src):
            return None
        return _valid(t)
    buf = range_bytes(fs, part)
    lines = _plain_object_lines(buf)
    if lines is None:
        return None
    schema = pa.schema([(c, pa.string()) for c in src])
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        t = pj.read_json(io.BytesIO(buf), parse_options=opts)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # a line the per-row path must judge (and count) itself
    return _valid(t) if t.num_rows == lines else None  # e.g. two objects on one line: the per-row path


MAX_BRACKETS = 512  # a line with fewer brackets nests less deep than Python's json recursion limit


def _plain_object_lines(buf: bytes) -> int | None:
    """The number of non-blank lines when every one is a JSON object Python's reader would take as it is
    (valid UTF-8, no lone ``\\r``, no surrogate escape, not nested near the recursion limit), else None.
    These checks come before Arrow, whose reader crashes on some inputs (a ``null`` line) and accepts
    others that Python rejects."""
    if _SURROGATE_ESCAPE.search(buf) or (b"\r" in buf and buf.count(b"\r") != buf.count(b"\r\n")):
        return None
    if np.frombuffer(buf, np.uint8).max(initial=0) >= 128:  # pure ASCII is valid UTF-8: no decode
        try:
            buf.decode("utf-8")
        except UnicodeDecodeError:
            return None
    n = _strict_lines(buf)
    return n if n is not None else _loose_lines(buf)


def _strict_lines(buf: bytes) -> int | None:
    """Vectorised :func:`_loose_lines` for the usual layout: every line is empty or exactly ``{...}`` (a
    CR before its LF allowed). None when any line is laid out otherwise (the line-by-line check decides)."""
    a = np.frombuffer(buf, dtype=np.uint8)
    if len(a) == 0:
        return 0
    nl = np.flatnonzero(a == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(a)]])
    ends = ends - ((ends > starts) & (a[np.maximum(ends - 1, 0)] == 13))  # a CR here is always before a LF
    live = ends > starts
    s, e = starts[live], ends[live]
    if len(s) == 0:
        return 0
    if not (np.all(a[s] == ord("{")) and np.all(a[e - 1] == ord("}"))):
        return None
    long = (e - s) > MAX_BRACKETS  # only a line this long can hold that many brackets: count in those
    for i in np.flatnonzero(long).tolist():
        line = buf[int(s[i]) : int(e[i])]
        if line.count(b"{") + line.count(b"[") > MAX_BRACKETS:
            return None
    return len(s)


def _loose_lines(buf: bytes) -> int | None:
    n = 0
    for line in buf.split(b"\n"):
        if not line.strip():
            continue  # blank, as the per-row reader skips it
        j = line.strip(b" \t\r")  # JSON's own whitespace only (Python rejects a form feed around an object)
        if j != line.strip() or not (j.startswith(b"{") and j.endswith(b"}")):
            return None
        if line.count(b"{") + line.count(b"[") > MAX_BRACKETS:
            return None
        n += 1
    return n


def _valid(t: pa.Table) -> pa.Table | None:
    """``t`` when every string is valid UTF-8 (Arrow's JSON reader passes invalid bytes through)."""
    try:
        t.validate(full=True)
    except pa.ArrowInvalid:
        return None
    return t


def _normalize(e: pl.Expr, keep_newlines: bool) -> pl.Expr:
    e = e.str.replace_all(CONTROL_ASCII, "")
    if keep_newlines:
        return e.str.replace_all(SPACE_RUN, " ").str.replace_all(r"\s*\n\s*", "\n").str.strip_chars()
    return e.str.replace_all(WS_RUN, " ").str.strip_chars()


def fast_rows(lr: LoadedRecipe, part: Partition, stats: Counter[str], fs: pafs.FileSystem) -> FastRows | None:
    """The partition's rows, or None when it must take the per-row path."""
    if not eligible(lr, part):
        return None
    raw = _read(lr, part, fs)
    if raw is None:
        return None
    r, f = lr.recipe, lr.recipe.filters
    qf, pf = r.fields["query"], r.fields["pos"]
    df = pl.from_arrow(raw)
    assert isinstance(df, pl.DataFrame)
    df = df.select(pl.col(qf).alias("q_raw"), pl.col(pf).alias("p_raw")).with_row_index("line")
    stats["records"] += df.height

    def is_ascii(c: str) -> pl.Expr:
        return pl.col(c).str.len_bytes() == pl.col(c).str.len_chars()

    ascii_ = is_ascii("q_raw") & is_ascii("p_raw")
    df = df.with_columns(
        simple=ascii_.fill_null(True),
        q=_normalize(pl.col("q_raw"), False),
        p=_normalize(pl.col("p_raw"), f.keep_newlines),
    )
    if f.truncate_chars:
        df = df.with_columns(p=pl.col("p").str.slice(0, f.truncate_chars))
    ql, pl_ = pl.col("q").str.len_chars(), pl.col("p").str.len_chars()
    reason = (
        pl.when(pl.col("q_raw").is_null() | pl.col("p_raw").is_null())
        .then(pl.lit("missing_field"))
        .when(ql == 0)
        .then(pl.lit("empty_query"))
        .when(ql < f.min_query_chars)
        .then(pl.lit("query_too_short"))
        .when(ql > f.max_query_chars)
        .then(pl.lit("query_too_long"))
        .when(pl_ == 0)
        .then(pl.lit("empty_pos"))
        .when(pl_ < f.min_doc_chars)
        .then(pl.lit("pos_too_short"))
        .when(pl_ > f.max_doc_chars)
        .then(pl.lit("pos_too_long"))
        .otherwise(pl.lit(None, dtype=pl.Utf8))
    )
    df = df.with_columns(reason=reason)
    fast = df.filter(pl.col("simple"))
    for why, n in fast.group_by("reason").len().iter_rows():
        if why is not None:
            stats[why] += n
    fast = fast.filter(pl.col("reason").is_null()).with_columns(
        ql=pl.col("q").str.to_lowercase(), pl=pl.col("p").str.to_lowercase()
    )
    # the comparison form of a normalised ASCII text is its lower case (newlines kept by the filters
    # become spaces there)
    # (a truncated one may end in a space, which the comparison form strips)
    p_cmp = pl.col("pl").str.replace_all(WS_RUN, " ") if f.keep_newlines else pl.col("pl")
    p_cmp = p_cmp.str.strip_chars()
    fast = fast.with_columns(key=pl.col("ql") + "\x1f" + pl.col("pl"), near=pl.col("ql") + " \x1f " + p_cmp)
    slow_rows, slow_lines, slow_near = [], [], []
    for line, q_raw, p_raw in df.filter(~pl.col("simple")).select("line", "q_raw", "p_raw").iter_rows():
        partial = map_record({qf: q_raw, pf: p_raw}, lr)
        if isinstance(partial, str):
            stats[partial] += 1
            continue
        cleaned = clean_row(partial, f, stats)
        if isinstance(cleaned, str):
            stats[cleaned] += 1
            continue
        row = _canonical(lr, cleaned)
        slow_rows.append(row)
        slow_lines.append(line)
        slow_near.append(near_text(row))
    ids = [hashlib.blake2b(k.encode("utf-8"), digest_size=8).hexdigest() for k in fast["key"].to_list()]
    n = fast.height
    const = {
        "neg": pa.array([[]] * n, pa.list_(pa.string())),
        "instruction": pa.array([r.instruction] * n, pa.string()),
        "symmetric": pa.array([r.task_type in SYMMETRIC_TASK_TYPES] * n, pa.bool_()),
        "category": pa.array([r.category] * n, pa.string()),
        "task_type": pa.array([r.task_type] * n, pa.string()),
        "recipe": pa.array([r.name] * n, pa.string()),
        "stage": pa.array([r.stage] * n, pa.string()),
        "lang": pa.array([r.language] * n, pa.string()),
        "label": pa.array([""] * n, pa.string()),
        "neg_labels": pa.array([[]] * n, pa.list_(pa.string())),
    }
    pos = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32)), fast["p"].to_arrow().cast(pa.string())
    )
    cols = {
        "id": pa.array(ids, pa.string()),
        "query": fast["q"].to_arrow().cast(pa.string()),
        "pos": pos,
        **const,
    }
    table = pa.table([cols[c] for c in ROW_SCHEMA.names], schema=ROW_SCHEMA)
    near = fast["near"].to_arrow().cast(pa.string())
    if slow_rows:  # back into source order
        lines = np.concatenate([fast["line"].to_numpy(), np.asarray(slow_lines, dtype=np.int64)])
        table = pa.concat_tables([table, pa.Table.from_pylist(slow_rows, schema=ROW_SCHEMA)])
        near = pa.concat_arrays([near, pa.array(slow_near, pa.string())])
        order = np.argsort(lines, kind="stable")
        table = table.take(pa.array(order))
        near = near.take(pa.array(order))
    return FastRows(table, near)
