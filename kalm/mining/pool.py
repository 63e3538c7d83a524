"""The inputs of one mining job: the candidate pool (the recipe's own documents, or a corpus file plus the
recipe's positives) and the text keys that tell equal texts apart after normalisation.

The pool's texts are streamed into a local Arrow file (:class:`kalm.mining.texts.TextFile`, read through a
memory map) as they are read; what stays in memory per pool text is a few integers (a 16-byte content
key, its pool id and a 63-bit key of the normalised text), not the text. Equal texts are found by the
content key, the embedding cache's own (:func:`kalm.mining.cache.text_key`); equal normalised texts by the
63-bit key (used only to exclude candidates equal to a positive or the query: a collision would exclude
one more candidate, never admit a wrong one).

>>> keys = Keys(); keys("Hello  World") == keys("hello world")
True
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import xxhash

from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot
from kalm.mining.cache import KEY_BYTES, text_key
from kalm.mining.config import PoolSpec
from kalm.mining.encode import Encoder
from kalm.mining.sample import norm_key
from kalm.mining.texts import TEXT_BATCH, Mapped, TextFile

KEY_MASK = (1 << 63) - 1  # keys are >= 0, so they never meet the -1/-2 fill values of the sampler
READ_BLOCK = 1 << 23  # bytes per read of a corpus file


def norm_hash(text: str) -> int:
    """63-bit key of the normalised text (:func:`kalm.mining.sample.norm_key`)."""
    return xxhash.xxh3_64_intdigest(norm_key(text).encode("utf-8", "surrogatepass")) & KEY_MASK


class Keys:
    """Normalised text -> a non-negative int: equal keys <=> equal after normalisation (hashes, no state)."""

    def __call__(self, text: str) -> int:
        return norm_hash(text)

    def many(self, texts: Iterable[str]) -> np.ndarray:
        return np.fromiter((norm_hash(t) for t in texts), dtype=np.int64)


@dataclass
class Pool:
    """Candidate texts (what ``neg`` will hold) in a memory-mapped file, their key ids and a hash index.

    ``rows[i]``: the file row of pool text ``i`` (its first occurrence; the file keeps repeats);
    ``hashes`` (sorted) / ``hash_ids``: content hash -> pool id; ``keys[i]``: normalised-text key.
    """

    file: TextFile
    rows: np.ndarray
    hashes: np.ndarray
    hash_ids: np.ndarray
    keys: np.ndarray
    doc_instruction: str | None = None
    enc: Encoder | None = None
    lineage: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, ids: np.ndarray | list[int]) -> list[str]:
        """The pool texts with these ids, in that order."""
        return self.file.take(self.rows[np.asarray(ids, dtype=np.int64)])

    take = texts  # a pool is a LazyTexts column of its texts, by pool id

    @property
    def formatted(self) -> Mapped:
        """What the model sees for each pool text (documents of a symmetric task get the instruction)."""
        ins, enc = self.doc_instruction, self.enc
        fmt = (lambda t: enc.format_query(t, ins)) if ins and enc is not None else (lambda t: t)
        return Mapped(self, fmt)

    def ids_of(self, texts: list[str]) -> np.ndarray:
        """Pool id of each text (-1: not in the pool)."""
        if not texts or not len(self.hashes):
            return np.full(len(texts), -1, dtype=np.int64)
        h = np.array([text_key(t) for t in texts], dtype=f"S{KEY_BYTES}")
        at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return np.where(self.hashes[at] == h, self.hash_ids[at], -1).astype(np.int64)


def _corpus_path(root: DataRoot, spec: PoolSpec) -> tuple[pafs.FileSystem, str]:
    assert spec.corpus is not None
    local = Path(spec.corpus).expanduser()
    if local.is_absolute():
        fs, where = pafs.LocalFileSystem(), str(local)
    else:
        fs, where = root.fs, root.path(spec.corpus)
    if fs.get_file_info(where).type != pafs.FileType.File:
        raise KalmError(f"pool corpus not found: {spec.corpus} (absolute, or relative to {root.uri})")
    if not spec.corpus.endswith((".parquet", ".jsonl", ".json")):
        raise KalmError(f"pool corpus {spec.corpus}: use a .parquet or .jsonl file")
    return fs, where


def _blocks(fs: pafs.FileSystem, where: str) -> Iterator[bytes]:
    with fs.open_input_stream(where) as f:
        while block := f.read(READ_BLOCK):
            yield bytes(block)


def corpus_lineage(root: DataRoot, spec: PoolSpec) -> dict[str, Any]:
    """Path, bytes and sha256 of the configured corpus file (one streaming pass; nothing kept)."""
    fs, where = _corpus_path(root, spec)
    digest, size = hashlib.sha256(), 0
    for block in _blocks(fs, where):
        digest.update(block)
        size += len(block)
    return {"path": spec.corpus, "bytes": size, "sha256": digest.hexdigest()[:16]}


def corpus_texts(root: DataRoot, spec: PoolSpec) -> Iterator[list[str]]:
    """The corpus file's non-empty texts (Parquet column or JSONL field ``spec.text_field``), a batch at a
    time: memory is one batch, whatever the file's size. A line that is not JSON is a one-line error."""
    fs, where = _corpus_path(root, spec)
    path, name = spec.corpus or "", spec.text_field
    if path.endswith(".parquet"):
        with fs.open_input_file(where) as f:
            pf = pq.ParquetFile(f)
            if name not in pf.schema_arrow.names:
                cols = ", ".join(pf.schema_arrow.names)
                raise KalmError(f"pool corpus {path}: no column {name!r} (columns: {cols})")
            for rb in pf.iter_batches(batch_size=TEXT_BATCH, columns=[name]):
                yield [t for t in rb.column(0).to_pylist() if isinstance(t, str) and t.strip()]
        return
    out: list[str] = []
    rest, n = b"", 0
    for block in _with_end(_blocks(fs, where)):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            n += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                msg = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
                raise KalmError(f"pool corpus {path}: line {n} is not JSON ({msg})") from None
            if isinstance(rec, dict) and isinstance(rec.get(name), str) and rec[name].strip():
                out.append(rec[name])
            if len(out) >= TEXT_BATCH:
                yield out
                out = []
    if out:
        yield out


def _with_end(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The blocks, then a newline so a last line without one is still split off."""
    yield from blocks
    yield b"\n"


def build_pool(
    rows: dict[str, list[Any]],
    corpus: Iterable[list[str]] | None,
    doc_instruction: str | None,
    enc: Encoder,
    scratch: str,
    corpus_name: str = "",
) -> Pool:
    """The recipe's positives and negatives (deduplicated, first-seen order), or a corpus plus positives,
    streamed into ``scratch/pool.arrow``. An empty corpus is a one-line error."""
    file = TextFile(f"{scratch}/pool.arrow")
    hashes: list[np.ndarray] = []
    keys: list[np.ndarray] = []

    def add(batch: list[Any]) -> None:
        batch = [t for t in batch if isinstance(t, str) and t.strip()]
        if batch:
            file.append(batch)
            hashes.append(np.array([text_key(t) for t in batch], dtype=f"S{KEY_BYTES}"))
            keys.append(Keys().many(batch))

    def from_rows(kinds: tuple[str, ...]) -> Iterator[list[str]]:
        out: list[str] = []
        for r in range(len(rows["pos"])):
            for kind in kinds:
                out += rows[kind][r] or []
            if len(out) >= TEXT_BATCH:
                yield out
                out = []
        yield out

    if corpus is not None:
        for batch in corpus:
            add(batch)
        if not len(file):
            raise KalmError(f"pool corpus {corpus_name}: no non-empty texts")
        for batch in from_rows(("pos",)):
            add(batch)  # positives must be rankable for the consistency filter
    else:
        for batch in from_rows(("pos", "neg")):
            add(batch)
    file.close()
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=f"S{KEY_BYTES}")
    uniq, first = np.unique(all_hashes, return_index=True)
    order = np.argsort(first, kind="stable")  # pool ids in first-seen order
    ids = np.empty(len(uniq), dtype=np.int64)
    ids[order] = np.arange(len(uniq))
    all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    return Pool(
        file=file,
        rows=first[order].astype(np.int64),
        hashes=uniq,
        hash_ids=ids,
        keys=all_keys[first[order]],
        doc_instruction=doc_instruction,
        enc=enc,
        lineage={"source": "corpus" if corpus is not None else "recipe", "size": len(uniq)},
    )


def most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


def pool_labels(cols: dict[str, list[Any]], pool: Pool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names, each row's class id and each pool text's (-1: none), from the rows' ``label`` (query
    and positives) and ``neg_labels`` (negatives, aligned with ``neg``); a text's first label wins."""
    names = sorted({lab for lab in cols["label"] if lab})
    index = {name: i for i, name in enumerate(names)}
    row_label = np.array([index.get(lab or "", -1) for lab in cols["label"]], dtype=np.int64)
    pool_label = np.full(len(pool), -1, dtype=np.int64)
    if not names:
        return names, row_label, pool_label
    texts: list[str] = []
    labs: list[int] = []
    for r, (pos, neg) in enumerate(zip(cols["pos"], cols["neg"], strict=True)):
        if row_label[r] >= 0:
            strs = [t for t in pos if isinstance(t, str)]
            texts += strs
            labs += [int(row_label[r])] * len(strs)
        nl = cols["neg_labels"][r] or []
        for t, lab in zip(neg, nl if len(nl) == len(neg) else [], strict=False):
            if lab in index and isinstance(t, str):
                texts.append(t)
                labs.append(index[lab])
    ids, lab_arr = pool.ids_of(texts), np.array(labs, dtype=np.int64)
    ok = ids >= 0
    uids, first = np.unique(ids[ok], return_index=True)  # the first (text, label) pair of each text wins
    pool_label[uids] = lab_arr[ok][first]
    return names, row_label, pool_label
