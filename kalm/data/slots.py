"""What the partitioned stage's units read and write besides Parquet (used by :mod:`kalm.data.units`):
checksummed Arrow IPC slot files (a reduce unit reads only its range of hash slots), signature files, row
ids as integers, and each unit's own peak RSS.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import xxhash

from kalm.core.errors import KalmError
from kalm.core.storage import DataRoot, file_checksum

SLOT_DIGEST = "xxh3_128"  # each slot's checksum, in its record batch's metadata
SIG_BITS = 16  # of each signature value stored for verification (write_sig)
SIG_DTYPE = np.uint16

U64 = pa.uint64()


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: ``/proc/self/clear_refs``), so each unit
    reports its own peak, not the largest of every unit a reused worker ran before."""
    # elsewhere the peak is the process's since it started (ru_maxrss)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak RSS (MB) since :func:`reset_peak_rss`, or since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _digest(arrays: list[np.ndarray]) -> str:
    """xxh3_128 of a slot's columns (intermediates: see kalm.core.storage.CHECKSUMS)."""
    h = xxhash.xxh3_128()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def write_slots(
    root: DataRoot,
    d: str,
    name: str,
    cols: dict[str, np.ndarray],
    slot: np.ndarray,
    n_slots: int,
    files: list[dict[str, Any]],
) -> None:
    """Write uint64 columns as an Arrow IPC file of ``n_slots`` record batches: batch ``s`` holds the rows
    whose ``slot`` is ``s`` (in their order here; empty batches too), its xxh3_128 in the batch's metadata.
    A reduce unit reads only its slots (ranged reads on S3) and verifies each."""
    # a stable sort of small ints: NumPy radix-sorts 16-bit keys (O(n)) where int64 keys take a merge sort
    order = np.argsort(slot.astype(np.uint16) if n_slots <= 1 << 16 else slot, kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    ends = np.cumsum(np.bincount(slot, minlength=n_slots))
    schema = pa.schema([(k, U64) for k in cols])
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema) as w:
        start = 0
        for end in ends.tolist():
            part = [v[start:end] for v in cols.values()]
            w.write_batch(
                pa.record_batch([pa.array(a, U64) for a in part], schema=schema),
                custom_metadata={SLOT_DIGEST: _digest(part)},
            )
            start = end
    data = sink.getvalue()
    root.write_bytes(f"{d}/{name}", data)
    files.append({"name": name, "rows": len(slot), "bytes": data.size, **file_checksum(data, "xxh3_128")})


def read_slots(root: DataRoot, ref: dict[str, Any], slots: range) -> dict[str, np.ndarray]:
    """The rows of ``slots`` of a file :func:`write_slots` wrote, each batch verified against its
    checksum (a one-line KalmError when the file was changed, truncated or is not one)."""
    uri = root.full_uri(ref["name"])
    try:
        with root.fs.open_input_file(root.path(ref["name"])) as f:
            if f.size() != ref["bytes"]:
                raise KalmError(
                    f"{uri} changed after it was written ({f.size()} bytes, the marker says {ref['bytes']})"
                )
            r = ipc.open_file(f)
            parts: dict[str, list[np.ndarray]] = {n: [] for n in r.schema.names}
            for s in slots:
                batch, meta = r.get_batch_with_custom_metadata(s)
                arrays = [c.to_numpy() for c in batch.columns]
                if meta is None or meta.get(SLOT_DIGEST.encode(), b"").decode() != _digest(arrays):
                    why = f"slot {s}'s checksum differs"
                    raise KalmError(f"{uri} changed after it was written ({why}): rebuild it (--force)")
                for n, a in zip(r.schema.names, arrays, strict=True):
                    parts[n].append(a)
    except (OSError, pa.ArrowInvalid, IndexError) as err:
        if isinstance(err, KalmError):
            raise
        raise KalmError(
            f"{uri} is listed in its marker but cannot be read: {str(err).splitlines()[0]}"
        ) from None
    return {n: np.concatenate(v) if v else np.empty(0, np.uint64) for n, v in parts.items()}


def write_sig(root: DataRoot, d: str, name: str, sig: np.ndarray, files: list[dict[str, Any]]) -> None:
    """Signatures as an uncompressed Arrow IPC file (they do not compress), each value's low
    :data:`SIG_BITS` bits only (b-bit minwise hashing, Li and König 2010): two different 32-bit values agree
    in their low 16 bits with probability 2^-16, so an estimated Jaccard J moves by at most (1 - J)·1.5e-5,
    for half the bytes written, read and checksummed."""
    n, k = sig.shape
    low = np.ascontiguousarray(sig.astype(SIG_DTYPE))
    width = k * low.itemsize
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(low)])
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, pa.schema([("sig", pa.binary(width))])) as w:
        w.write_batch(pa.record_batch([col], names=["sig"]))
    data = sink.getvalue()
    root.write_bytes(f"{d}/{name}", data)
    files.append({"name": name, "rows": n, "bytes": data.size, **file_checksum(data, "xxh3_128")})


def read_sig(root: DataRoot, ref: dict[str, Any], num_perm: int) -> np.ndarray:
    """A partition's stored signatures (n, num_perm) (:data:`SIG_DTYPE`), verified against the marker's
    size and checksum."""
    data = root.read_bytes_checked(ref["name"], ref)
    col = ipc.open_file(pa.BufferReader(data)).get_batch(0).column(0)
    return sig_array(col, num_perm)


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row ids (16 lowercase hex digits, :func:`kalm.core.schema.row_id`) as uint64, vectorised."""
    col = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    n = len(col)
    if n == 0:
        return np.empty(0, np.uint64)
    col = col.cast(pa.string())
    off = np.frombuffer(col.buffers()[1], np.int32, count=n + 1, offset=col.offset * 4)
    if col.null_count or not np.all(np.diff(off) == 16):
        raise KalmError("row ids must be 16 hex digits")  # every id the ingest writes is
    raw = np.frombuffer(col.buffers()[2], np.uint8, count=16 * n, offset=int(off[0]))
    nib = _HEX[raw].reshape(n, 16)
    if (nib == 255).any():
        raise KalmError("row ids must be 16 hex digits")
    b = (nib[:, 0::2] << 4) | nib[:, 1::2]  # big-endian bytes
    return np.ascontiguousarray(b).view(">u8").ravel().astype(np.uint64)


def sig_array(col: pa.Array | pa.ChunkedArray, num_perm: int) -> np.ndarray:
    """A fixed-size-binary column of stored signatures as an array (n, num_perm) of their stored width,
    without a copy."""
    flat = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = flat.type.byte_width // num_perm
    dtype = {2: np.uint16, 4: np.uint32}[width]
    n = len(flat)
    return np.frombuffer(
        flat.buffers()[1], dtype=dtype, count=n * num_perm, offset=flat.offset * num_perm * width
    ).reshape(n, num_perm)
