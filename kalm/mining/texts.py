"""Texts by position without holding them as Python objects: a local Arrow IPC file read through a memory map,
and lazy views over it (formatted, concatenated) that only materialise the rows asked for.

Mining's candidate pool can be far larger than a node's memory would like as ``list[str]`` (a Python string
costs ~50 bytes of header besides its text, a dict entry another ~100). Here a text costs its UTF-8 bytes on
local disk (page cache, evictable) and 8 bytes of offsets; a caller holds only the batch it works on.

>>> f = TextFile(tmp + "/t.arrow")                                               # doctest: +SKIP
>>> f.append(["a", "b"]); f.append(["c"]); f.close()                            # doctest: +SKIP
>>> f.take(np.array([2, 0]))                                                     # doctest: +SKIP
['c', 'a']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

TEXT_BATCH = 65536  # texts per batch when a whole text column is walked (hashing, writing)


@runtime_checkable
class LazyTexts(Protocol):
    """Texts by position: ``len`` and ``take`` (rows in the order asked, as ``str``)."""

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray) -> list[str]: ...


def take(texts: Sequence[str] | LazyTexts, rows: np.ndarray | Sequence[int]) -> list[str]:
    """``[texts[i] for i in rows]`` for a list or a :class:`LazyTexts`."""
    if isinstance(texts, LazyTexts):
        return texts.take(np.asarray(rows, dtype=np.int64))
    return [texts[int(i)] for i in rows]


def batches(texts: Sequence[str] | LazyTexts, size: int = TEXT_BATCH) -> Iterator[tuple[int, list[str]]]:
    """``(start, texts[start:start + size])`` over the whole column, materialising one batch at a time."""
    n = len(texts)
    for s in range(0, n, size):
        yield s, take(texts, np.arange(s, min(n, s + size)))


class TextFile:
    """Append-only texts in a local Arrow IPC file (one record batch per :meth:`append`); after
    :meth:`close` they are read through a memory map, by position."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._schema = pa.schema([("text", pa.large_string())])
        self._chunks: list[pa.Array] = []
        self._starts = np.zeros(1, dtype=np.int64)
        self._n = 0

    def append(self, texts: list[str]) -> None:
        if self._writer is None:
            self._writer = pa.ipc.new_file(self.path, self._schema)
        if texts:
            column = pa.array(texts, pa.large_string())
            self._writer.write_batch(pa.record_batch([column], schema=self._schema))
            self._n += len(texts)

    def close(self) -> TextFile:
        if self._writer is None:
            self._writer = pa.ipc.new_file(self.path, self._schema)
        self._writer.close()
        reader = pa.ipc.open_file(pa.memory_map(self.path, "r"))
        self._chunks = [reader.get_batch(i).column(0) for i in range(reader.num_record_batches)]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks], dtype=np.int64)
        return self

    def __len__(self) -> int:
        return self._n

    def take(self, rows: np.ndarray) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return []
        if rows.min() < 0 or rows.max() >= self._n:
            raise IndexError(f"row out of range 0..{self._n - 1}")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        chunk = np.searchsorted(self._starts, srt, side="right") - 1
        out: list[str] = [""] * len(rows)
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(srt)], strict=True):
            c = int(chunk[a])
            got = self._chunks[c].take(pa.array(srt[a:b] - self._starts[c])).to_pylist()
            for j, t in zip(order[a:b], got, strict=True):
                out[j] = t
        return out


class Mapped:
    """``fn`` applied to each text of ``base`` when taken."""

    def __init__(self, base: Sequence[str] | LazyTexts, fn: Callable[[str], str]) -> None:
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def take(self, rows: np.ndarray) -> list[str]:
        return [self.fn(t) for t in take(self.base, rows)]


class Concat:
    """Several text columns one after the other."""

    def __init__(self, parts: list[Sequence[str] | LazyTexts]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: np.ndarray) -> list[str]:
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out: list[str] = [""] * len(rows)
        for p in np.unique(part):
            at = np.flatnonzero(part == p)
            for j, t in zip(at, take(self.parts[int(p)], rows[at] - self.starts[p]), strict=True):
                out[j] = t
        return out
