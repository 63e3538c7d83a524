"""The resumable unit of mining and scoring: a chunk of rows written as one Parquet file plus a done marker
(with its sha256) under ``<mined|scored>/_work/<stage>/<recipe>/<job>/``; a rerun after a crash (even
``kill -9``) skips every chunk whose marker matches its file, and publishing copies the chunks into the
output folder, manifest last.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kalm.core.errors import KalmError
from kalm.core.hashing import hash_obj
from kalm.core.layout import MANIFEST
from kalm.core.results import StageResult
from kalm.core.schema import ROW_SCHEMA
from kalm.core.storage import ROW_GROUP_ROWS, DataRoot
from kalm.mining.sample import new_stats

log = logging.getLogger(__name__)


def chunk_paths(work: str, i: int) -> tuple[str, str]:
    return f"{work}/chunk-{i:05d}.parquet", f"{work}/chunk-{i:05d}.done.json"


def finished_chunks(root: DataRoot, work: str, n_chunks: int) -> dict[int, dict[str, Any]]:
    """Chunks whose marker exists and whose file still has the recorded checksum."""
    done: dict[int, dict[str, Any]] = {}
    for i in range(n_chunks):
        data_rel, marker_rel = chunk_paths(work, i)
        if not root.exists(marker_rel) or not root.exists(data_rel):
            continue
        marker = root.read_json(marker_rel)
        if hashlib.sha256(root.read_bytes(data_rel)).hexdigest() == marker.get("sha256"):
            done[i] = marker
        else:
            log.warning("chunk %s does not match its marker; recomputing it", data_rel)
    return done


def resume_state(
    root: DataRoot, work: str, rows: int, chunk: int, what: str
) -> tuple[int, dict[int, dict[str, Any]], list[int]]:
    """A job of ``rows`` rows in chunks of ``chunk``: the number of chunks, the finished ones (markers) and
    the pending ones; a resumed job says so in the log (``what``: e.g. ``mined finetune/faq``)."""
    n_chunks = math.ceil(rows / chunk) if rows else 0
    markers = finished_chunks(root, work, n_chunks)
    pending = [i for i in range(n_chunks) if i not in markers]
    if markers:
        job = work.rstrip("/").rsplit("/", 1)[-1]
        log.info("%s: resuming job %s, %d of %d chunks done", what, job, len(markers), n_chunks)
    return n_chunks, markers, pending


def write_chunk(
    root: DataRoot,
    work: str,
    i: int,
    out: pa.Table,
    stats: dict[str, Any],
    index: dict[str, Any] | None,
    schema: pa.Schema = ROW_SCHEMA,
) -> dict[str, Any]:
    """The chunk file first (whole: temp name + rename, or one PUT), then its marker."""
    out = pa.Table.from_arrays(out.columns, schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(out, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    data = buf.getvalue().to_pybytes()
    data_rel, marker_rel = chunk_paths(work, i)
    root.write_bytes(data_rel, data)
    marker = {
        "chunk": i,
        "rows": out.num_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
        "stats": stats,
        "index": index,
    }
    root.write_json(marker_rel, marker)
    return marker


def with_negatives(
    chunk: pa.Table, keep: list[int], negs: list[list[str]], neg_labels: list[list[str]]
) -> pa.Table:
    """The kept rows of a chunk with their mined negatives (and each negative's class, "" unknown)."""
    kept = chunk.take(pa.array(keep, pa.int64()))
    kept = kept.set_column(
        kept.schema.get_field_index("neg"), ROW_SCHEMA.field("neg"), pa.array(negs, pa.list_(pa.string()))
    )
    i = kept.schema.get_field_index("neg_labels")
    return kept.set_column(i, ROW_SCHEMA.field("neg_labels"), pa.array(neg_labels, pa.list_(pa.string())))


def pre_drops(cols: dict[str, list[Any]], own_pos: list[list[int]], rows: range) -> tuple[list[int], dict]:
    """Rows that can be mined, and the stats of those that cannot (empty query, no positive)."""
    stats = new_stats()
    stats["rows_in"] = len(rows)
    ok: list[int] = []
    for r in rows:
        if not cols["query"][r].strip():
            stats["drops"]["empty_query"] = stats["drops"].get("empty_query", 0) + 1
        elif not own_pos[r]:
            stats["drops"]["no_positive"] = stats["drops"].get("no_positive", 0) + 1
        else:
            ok.append(r)
    return ok, stats


def publish(
    root: DataRoot,
    out: str,
    work_root: str,
    work: str,
    markers: dict[int, dict[str, Any]],
    n_chunks: int,
    manifest: dict[str, Any],
    timing: dict[str, float],
    t_start: float,
) -> None:
    """Copy the chunk files into a staging folder of ``out``, manifest last, publish atomically, then drop
    the recipe's work folder ``work_root`` (every job in it)."""
    staging = root.staging_dir(out)
    files = []
    for i in range(n_chunks):
        mk = markers[i]
        if mk["rows"] == 0:
            continue
        data = root.read_bytes(chunk_paths(work, i)[0])
        if hashlib.sha256(data).hexdigest() != mk["sha256"]:
            raise KalmError(
                f"{root.full_uri(work)}: chunk {i} changed after it was written; rerun to redo it"
            )
        name = f"part-{i:05d}.parquet"
        root.write_bytes(f"{staging}/{name}", data)
        files.append({"name": name, "rows": mk["rows"], "sha256": mk["sha256"][:16], "bytes": len(data)})
    manifest["files"] = files
    manifest["fingerprint"] = hash_obj([[f["name"], f["sha256"], f["rows"]] for f in files])
    manifest["timing"] = {**timing, "total_s": round(time.perf_counter() - t_start, 3)}
    manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    root.write_json(f"{staging}/{MANIFEST}", manifest)  # manifest last
    root.publish_dir(staging, out)
    root.delete_dir(work_root)


def folder_result(
    root: DataRoot, stage: str, name: str, out: str, m: dict[str, Any], cached: bool, t0: float, maker: str
) -> StageResult:
    """The result of a chunked stage (``mine``, ``score``) for one recipe's published folder ``out``;
    ``maker`` names the manifest key of what made the rows (``miner``, ``teacher``)."""
    keys = (maker, "input_fingerprint", "config_hash", "fingerprint")
    return StageResult(
        stage=stage,
        name=name,
        outputs=[root.full_uri(out)],
        rows=int(m["rows_out"]),
        cached=cached,
        seconds=round(time.perf_counter() - t0, 3),
        lineage={k: m.get(k) for k in keys},
        manifest=m,
    )
