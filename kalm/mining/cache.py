"""Embedding cache on the data root, keyed by (encoder, text hash): re-mining encodes only what is new.

Layout (one folder per encoder = model fingerprint + precision)::

    cache/embeddings/<fingerprint>-<precision>/part-<hash>.parquet   columns key (16 B), vec (D float32), crc

``key`` is the BLAKE2b-128 of the exact text the model saw (instruction included), ``vec`` the raw float32
bytes and ``crc`` their CRC-32. Shards are content-named and written whole (temp name + rename, or one S3
PUT), so a killed run leaves finished shards usable and never a half shard. On read, a shard that does not
parse, or an entry whose length or CRC is wrong, is a *corrupt entry*: it is logged, counted, rewritten
without the bad entries, and the texts are encoded again.

>>> store = EmbeddingStore(root, "cache/embeddings/ab12-fp32", dim=384)        # doctest: +SKIP
>>> vecs, stats = embed_texts(encoder, ["a text", "another"], store)          # doctest: +SKIP
>>> stats["encoded"], stats["cache_hits"]                                       # doctest: +SKIP
(2, 0)
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot
from kalm.data.executors import Executor
from kalm.mining.encode import Encoder
from kalm.mining.texts import LazyTexts, take
from kalm.mining.texts import batches as text_batches

log = logging.getLogger(__name__)

KEY_BYTES = 16
UNIT_WAVE = 4  # encode units in flight per worker (their texts are what the driver holds)
Sink = Callable[[np.ndarray, np.ndarray], None]  # (indices, vectors (len, D) float32) -> stored somewhere
SHARD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.binary(KEY_BYTES), nullable=False),
        pa.field("vec", pa.binary(), nullable=False),
        pa.field("crc", pa.uint32(), nullable=False),
    ]
)


def text_key(text: str) -> bytes:
    """16-byte content hash of a text, e.g. ``len(text_key("a")) == 16``."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()


def _is_corruption(err: BaseException) -> bool:
    """A shard that does not parse (as opposed to a storage outage, which must propagate and be retried)."""
    if isinstance(err, (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError)):
        return True
    text = str(err).lower()
    return isinstance(err, OSError) and any(
        s in text
        for s in ("parquet", "thrift", "deserializ", "corrupt", "magic", "decompress", "unexpected end")
    )


class EmbeddingStore:
    """Append-only shards of (key, vector); the key index is read once per process and kept current.
    Inserting does not touch the index (it is rebuilt, one sort, at the next lookup), so filling a cache of
    n texts costs O(n log n) in all, not a sort of every key after every shard."""

    def __init__(self, root: DataRoot, rel: str, dim: int) -> None:
        self.root, self.rel, self.dim = root, rel.rstrip("/"), int(dim)
        self._shards: dict[str, np.ndarray] = {}  # shard name -> its keys (S16)
        self._sorted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # keys, shard no, row
        self._names: list[str] = []
        self.corrupt_shards = 0

    # -- index -------------------------------------------------------------------------------------------
    def _list(self) -> list[str]:
        sel = pafs.FileSelector(self.root.path(self.rel), allow_not_found=True)
        return sorted(
            i.base_name
            for i in self.root.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.base_name.startswith("part-")
            and i.base_name.endswith(".parquet")
        )

    def refresh(self) -> None:
        """Pick up shards written since the last call (by this or another process)."""
        new = [n for n in self._list() if n not in self._shards]
        for name in new:
            try:
                keys = self.root.read_parquet(f"{self.rel}/{name}", columns=["key"]).column("key")
                self._shards[name] = np.array(keys.to_pylist(), dtype=f"S{KEY_BYTES}")
            except Exception as err:
                if not _is_corruption(err):
                    raise
                self.corrupt_shards += 1
                log.warning("embedding cache: shard %s/%s is unreadable (%s); removed", self.rel, name, err)
                self._delete(name)
        if new or self._sorted is None:
            self._reindex()

    def _reindex(self) -> None:
        self._names = sorted(self._shards)
        if not self._names:
            self._sorted = (np.zeros(0, dtype=f"S{KEY_BYTES}"), np.zeros(0, np.int32), np.zeros(0, np.int64))
            return
        keys = np.concatenate([self._shards[n] for n in self._names])
        shard_no = np.concatenate(
            [np.full(len(self._shards[n]), i, np.int32) for i, n in enumerate(self._names)]
        )
        rows = np.concatenate([np.arange(len(self._shards[n]), dtype=np.int64) for n in self._names])
        order = np.argsort(keys, kind="stable")
        self._sorted = (keys[order], shard_no[order], rows[order])

    def __len__(self) -> int:
        return sum(len(k) for k in self._shards.values())

    def _delete(self, name: str) -> None:
        path = self.root.path(f"{self.rel}/{name}")
        if self.root.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.root.fs.delete_file(path)
        self._shards.pop(name, None)

    # -- read --------------------------------------------------------------------------------------------
    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """keys (N,) S16 -> (vectors (N, D) float32, found (N,) bool, corrupt entries seen).

        Corrupt entries count as not found; their shard is rewritten without them.
        """
        out = np.zeros((len(keys), self.dim), dtype=np.float32)

        def sink(idx: np.ndarray, vecs: np.ndarray) -> None:
            out[idx] = vecs

        found, corrupt = self.lookup_into(keys, sink)
        return out, found, corrupt

    def lookup_into(self, keys: np.ndarray, sink: Sink) -> tuple[np.ndarray, int]:
        """As :meth:`lookup`, but each shard's hits go to ``sink(indices into keys, vectors)`` as the shard is
        read: host memory is one shard, whatever the number of keys (the caller may write to a memmap)."""
        self.refresh()
        assert self._sorted is not None
        skeys, sshard, srow = self._sorted
        found = np.zeros(len(keys), dtype=bool)
        if len(skeys) == 0 or len(keys) == 0:
            return found, 0
        pos = np.searchsorted(skeys, keys)
        pos_c = np.minimum(pos, len(skeys) - 1)
        hit = (pos < len(skeys)) & (skeys[pos_c] == keys)
        corrupt = 0
        hit_idx = np.nonzero(hit)[0]
        for shard in np.unique(sshard[pos_c[hit_idx]]):
            name = self._names[int(shard)]
            sel = hit_idx[sshard[pos_c[hit_idx]] == shard]
            rows = srow[pos_c[sel]]
            try:
                table = self.root.read_parquet(f"{self.rel}/{name}", columns=["vec", "crc"])
                vec_col = table.column("vec").to_pylist()
                crc_col = table.column("crc").to_numpy()
            except Exception as err:
                if not _is_corruption(err):
                    raise
                corrupt += len(sel)
                self.corrupt_shards += 1
                log.warning("embedding cache: shard %s/%s is unreadable (%s); removed", self.rel, name, err)
                self._delete(name)
                continue
            bad_rows: list[int] = []
            good: list[int] = []
            blobs: list[bytes] = []
            for i, r in zip(sel, rows, strict=True):
                blob = vec_col[r]
                if len(blob) != 4 * self.dim or zlib.crc32(blob) != int(crc_col[r]):
                    bad_rows.append(int(r))
                    continue
                good.append(int(i))
                blobs.append(blob)
            if good:
                idx = np.array(good, dtype=np.int64)
                sink(idx, np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(good), self.dim))
                found[idx] = True
            if bad_rows:
                corrupt += len(bad_rows)
                log.warning(
                    "embedding cache: %d corrupt entr%s in %s/%s (length or checksum); recomputing them",
                    len(bad_rows),
                    "y" if len(bad_rows) == 1 else "ies",
                    self.rel,
                    name,
                )
                self._drop_rows(name, bad_rows)
        if corrupt:
            self._reindex()
        return found, corrupt

    def _drop_rows(self, name: str, bad_rows: list[int]) -> None:
        """Rewrite a shard without its corrupt rows (under a new content name), then delete the old one."""
        table = self.root.read_parquet(f"{self.rel}/{name}")
        keep = np.ones(table.num_rows, dtype=bool)
        keep[bad_rows] = False
        good = table.filter(pa.array(keep))
        if good.num_rows:
            self._write(good)
        self._delete(name)

    # -- write -------------------------------------------------------------------------------------------
    def put(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        """Append one shard: keys (N,) S16, vecs (N, D) float32."""
        if len(keys) == 0:
            return
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.shape != (len(keys), self.dim):
            raise ValueError(f"vectors of shape {vecs.shape} for {len(keys)} keys of dim {self.dim}")
        blobs = [v.tobytes() for v in vecs]
        table = pa.table(
            {
                "key": pa.array([bytes(k).ljust(KEY_BYTES, b"\0") for k in keys], pa.binary(KEY_BYTES)),
                "vec": pa.array(blobs, pa.binary()),
                "crc": pa.array([zlib.crc32(b) for b in blobs], pa.uint32()),
            },
            schema=SHARD_SCHEMA,
        )
        self._write(table)
        self._sorted = None  # re-sorted once, at the next lookup: inserts stay O(shard), not O(cache)

    def _write(self, table: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue().to_pybytes()
        name = f"part-{hashlib.sha256(data).hexdigest()[:20]}.parquet"
        self.root.write_bytes(f"{self.rel}/{name}", data)
        self._shards[name] = np.array(table.column("key").to_pylist(), dtype=f"S{KEY_BYTES}")


def embed_texts(
    encoder: Encoder,
    texts: Sequence[str] | LazyTexts,
    store: EmbeddingStore,
    batch_size: int = 64,
    shard_texts: int = 8192,
    progress: bool = False,
    desc: str = "encode",
    executor: Executor | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Vectors for ``texts`` (formatted, as the model sees them): (N, D) float32, from the store where valid.

    ``out``: an (N, D) float32 array to fill and return (e.g. an ``np.memmap``: vectors go there shard by
    shard, so host memory stays one cache shard, whatever N); default a new array. ``texts`` may be a
    :class:`kalm.mining.texts.LazyTexts` (e.g. a memory-mapped file): they are then read a batch (hashing)
    or a shard (encoding) at a time, never all at once.
    Missing texts are encoded in a fixed order (characters desc, then key; batches within a shard by token
    count) and stored one shard per ``shard_texts``; a rerun after a kill finds the finished shards and
    re-forms exactly the same groups and batches for the rest, so its vectors are bit-identical to an
    uninterrupted run's. With an ``executor`` of several workers (local processes, or Ray across nodes)
    the same groups are encoded as units, each by a worker that loads the same model (checked by its key)
    and writes its group as one shard of the store: the vectors one process computes (tested).
    Stats: ``texts``, ``unique``, ``cache_hits``, ``encoded``, ``corrupt_entries`` (bad length or CRC),
    ``corrupt_shards`` (unreadable files; their texts count as misses), ``encode_s``, ``encoded_per_s``.
    """
    t0 = time.perf_counter()
    shards_before = store.corrupt_shards
    keys = np.empty(len(texts), dtype=f"S{KEY_BYTES}")
    chars = np.empty(len(texts), dtype=np.int64)
    for s, batch in text_batches(texts):
        keys[s : s + len(batch)] = [text_key(t) for t in batch]
        chars[s : s + len(batch)] = [len(t) for t in batch]
    ukeys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    del keys
    if out is None:
        out = np.zeros((len(texts), store.dim), dtype=np.float32)
    elif out.shape != (len(texts), store.dim):
        raise ValueError(f"out has shape {out.shape}, not ({len(texts)}, {store.dim})")
    scatter = _Scatter(inverse.reshape(-1), len(ukeys), out)
    found, corrupt = store.lookup_into(ukeys, scatter)
    missing = np.nonzero(~found)[0]
    if len(missing):
        rows = first[missing]  # a row holding each missing text
        # shards by characters (no tokenizer pass up front); within a shard batches go by token count
        order = np.lexsort((ukeys[missing], -chars[rows]))
        groups = [order[s : s + shard_texts] for s in range(0, len(order), shard_texts)]

        def texts_of(j: int) -> list[str]:
            return take(texts, rows[groups[j]])

        if executor is not None and executor.workers > 1 and len(groups) > 1:
            _encode_units(executor, encoder, store, texts_of, len(groups), batch_size)
            ok, _ = store.lookup_into(ukeys[missing], lambda idx, v: scatter(missing[idx], v))
            if not ok.all():
                raise KalmError(
                    f"{int((~ok).sum())} texts encoded by the workers are missing from {store.rel}"
                )
        else:
            bar = _bar(len(missing), desc) if progress else None

            def read(j: int) -> tuple[list[str], list[list[int]]]:
                group = texts_of(j)
                return group, encoder.tokenize(group)

            # the next shard is read and tokenized in a thread while this one encodes
            with ThreadPoolExecutor(1) as reader:
                ahead = reader.submit(read, 0)
                for j, grp in enumerate(groups):
                    group, ids = ahead.result()
                    if j + 1 < len(groups):
                        ahead = reader.submit(read, j + 1)
                    update = bar.update if bar is not None else None
                    v = encoder.encode(group, batch_size=batch_size, ids=ids, progress=update)
                    store.put(ukeys[missing[grp]], v)
                    scatter(missing[grp], v)
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - t0
    stats = {
        "texts": len(texts),
        "unique": len(ukeys),
        "cache_hits": int(found.sum()),
        "encoded": len(missing),
        "corrupt_entries": corrupt,
        "corrupt_shards": store.corrupt_shards - shards_before,
        "encode_s": round(seconds, 3),
        "encoded_per_s": round(len(missing) / seconds, 1) if len(missing) and seconds > 0 else None,
    }
    return out, stats


class _Scatter:
    """Writes the vectors of unique texts to every row of ``out`` that holds that text (``inverse``: row ->
    unique index, as ``np.unique`` gives it)."""

    def __init__(self, inverse: np.ndarray, n_unique: int, out: np.ndarray) -> None:
        self.order = np.argsort(inverse, kind="stable")  # rows grouped by unique index
        counts = np.bincount(inverse, minlength=n_unique)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.out = out

    def __call__(self, uidx: np.ndarray, vecs: np.ndarray) -> None:
        uidx = np.asarray(uidx, dtype=np.int64)
        counts = self.starts[uidx + 1] - self.starts[uidx]
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = self.order[np.repeat(self.starts[uidx], counts) + within]
        self.out[rows] = np.repeat(np.asarray(vecs, dtype=np.float32), counts, axis=0)


_WORKER_ENCODERS: dict[tuple[Any, ...], Encoder] = {}  # per worker process: the model loads once


def _encode_units(
    executor: Executor,
    encoder: Encoder,
    store: EmbeddingStore,
    texts_of: Callable[[int], list[str]],
    n_groups: int,
    batch_size: int,
) -> None:
    """Encode each group on a worker (:func:`encode_unit`); every unit writes its shard to ``store``. Units
    go out in waves of ``UNIT_WAVE`` per worker, so the driver holds the texts of one wave, not of all."""
    e = encoder.embedder
    threads = max(1, (os.cpu_count() or 1) // executor.workers) if executor.kind == "local" else 0
    common = {
        "model": encoder.path,
        "root": store.root.uri,
        "rel": store.rel,
        "key": encoder.key,
        "max_length": e.max_length,
        "precision": encoder.precision,
        "devices": "cpu" if str(e.device) == "cpu" else "auto",
        "batch_size": batch_size,
        "threads": threads,
    }
    t0 = time.perf_counter()
    done: list[dict[str, Any]] = []
    wave = max(1, UNIT_WAVE * executor.workers)
    for s in range(0, n_groups, wave):
        units = range(s, min(n_groups, s + wave))
        calls = [{"unit": f"encode-{j}", "texts": texts_of(j), **common} for j in units]
        done += executor.map(encode_unit, calls)
    log.info(
        "encoded %d texts in %d units on %d %s workers in %.1fs",
        sum(r["texts"] for r in done),
        len(done),
        executor.workers,
        executor.kind,
        time.perf_counter() - t0,
    )


def encode_unit(
    unit: str,
    texts: list[str],
    model: str,
    root: str,
    rel: str,
    key: str,
    max_length: int,
    precision: str,
    devices: str,
    batch_size: int,
    threads: int,
) -> dict[str, Any]:
    """One cache shard, on a worker: encode ``texts`` with the model (loaded once per process) and write
    them to the store. The worker's encoder must have the driver's key (same weights, precision, length)."""
    import torch

    from kalm.mining.encode import load_encoder

    if threads:
        torch.set_num_threads(threads)
    spec = (model, root, max_length, precision, devices)
    if spec not in _WORKER_ENCODERS:
        _WORKER_ENCODERS[spec] = load_encoder(model, None, max_length, precision, devices)
    enc = _WORKER_ENCODERS[spec]
    if enc.key != key:
        raise KalmError(f"unit {unit}: the worker loaded {enc.key}, not the driver's model {key}")
    t0 = time.perf_counter()
    vecs = enc.encode(texts, batch_size=batch_size)
    keys = np.array([text_key(t) for t in texts], dtype=f"S{KEY_BYTES}")
    EmbeddingStore(DataRoot.from_uri(root), rel, enc.dim).put(keys, vecs)
    return {"texts": len(texts), "seconds": round(time.perf_counter() - t0, 3)}


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text", leave=False)
