"""The data root: one place for every output, a local folder or an ``s3://bucket/prefix`` URI.

All stage code goes through :class:`DataRoot` so the same code writes locally or to S3. Completeness is
decided by manifests only: a folder without ``_manifest.json`` is never taken as finished work.

Example::

    root = DataRoot.from_uri("./data")
    root.write_json("x/_manifest.json", {"rows": 3})
    root.read_json("x/_manifest.json")["rows"]  # 3
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kalm.core.errors import KalmError
from kalm.core.layout import MANIFEST, STAGING
from kalm.core.secrets import refuse_credentials

log = logging.getLogger(__name__)

DEFAULT_ROOT = "./data"
# Rows per Parquet row group of every shard we write: the unit the training sampler reads and buffers
# (kalm.training.sampler), so its memory is bounded by a few row groups, not by a shard.
ROW_GROUP_ROWS = 1024


def resolve_root(cli_value: str | None = None) -> str:
    """``--data-root`` beats ``KALM_DATA_ROOT`` beats ``./data``."""
    return cli_value or os.environ.get("KALM_DATA_ROOT") or DEFAULT_ROOT


def s3_options_from_env() -> dict[str, Any]:
    """S3 connection options from the standard AWS variables plus an optional endpoint override."""
    endpoint = os.environ.get("KALM_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        refuse_credentials(endpoint, "S3 endpoint (KALM_S3_ENDPOINT / AWS_ENDPOINT_URL)")
        parsed = urlparse(endpoint)
        opts["endpoint_override"] = parsed.netloc or parsed.path
        opts["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    return opts


def s3_filesystem() -> pafs.FileSystem:
    """pyarrow's S3 client with retries on transient errors (throttling, 5xx, resets)."""
    opts = s3_options_from_env()
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5), **opts)


def explain_s3_error(err: OSError, what: str) -> str:
    """A one-line reason for an S3 failure; never includes credentials (pyarrow's messages do not)."""
    text = str(err)
    low = text.lower()
    if "access_denied" in low or "accessdenied" in low or "invalidaccesskeyid" in low or "403" in low:
        return f"{what}: access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "nosuchbucket" in low or "no such bucket" in low:
        return f"{what}: bucket does not exist"
    if "curl" in low or "connect" in low or "timed out" in low:
        return f"{what}: cannot reach the S3 endpoint ({text.splitlines()[0][:200]})"
    return f"{what}: {text.splitlines()[0][:300]}"


def check_bucket(fs: pafs.FileSystem, bucket: str) -> None:
    """Fail fast with a clear message for a missing bucket or bad credentials."""
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise KalmError(explain_s3_error(err, f"s3://{bucket}")) from None
    if info.type == pafs.FileType.NotFound:
        raise KalmError(f"s3://{bucket}: bucket does not exist")


@dataclass(frozen=True)
class DataRoot:
    """A filesystem plus a base path; every stage path is relative to it."""

    uri: str
    fs: pafs.FileSystem
    base: str

    @classmethod
    def from_uri(cls, uri: str | None = None) -> DataRoot:
        uri = resolve_root(uri)
        refuse_credentials(uri, "data root")
        if uri.startswith("s3://"):
            parsed = urlparse(uri)
            if not parsed.netloc:
                raise KalmError(f"invalid S3 data root {uri!r}: use s3://bucket/prefix")
            fs = s3_filesystem()
            check_bucket(fs, parsed.netloc)
            return cls(uri=uri.rstrip("/"), fs=fs, base=(parsed.netloc + parsed.path).rstrip("/"))
        if "://" in uri:
            raise KalmError(f"unsupported data root {uri!r}: use a local path or s3://bucket/prefix")
        path = Path(uri).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(uri=str(path), fs=pafs.LocalFileSystem(), base=str(path))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def full_uri(self, *parts: str) -> str:
        """A URI other libraries understand (polars, datasets): local path or s3://."""
        p = self.path(*parts)
        return p if self.is_local else "s3://" + p

    # -- small files -------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return bytes(f.read())

    def write_bytes(self, rel: str, data: bytes | pa.Buffer) -> None:
        """Write to a temporary name, then rename (local) or single PUT (S3: objects appear whole)."""
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, final)
        else:
            with self.fs.open_output_stream(final) as f:
                f.write(data)

    def read_json(self, rel: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.read_bytes(rel))
        return data

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    # -- folders -----------------------------------------------------------------------------------
    def list_dirs(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(
            i.base_name
            for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))
        )

    def delete_dir(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.get_file_info(p).type != pafs.FileType.NotFound:
            self.fs.delete_dir(p)

    def staging_dir(self, rel: str) -> str:
        """A fresh sibling folder to build ``rel`` in before publishing it.

        Leftovers of an earlier build of the same ``rel`` that was killed (its staging folder, or the old
        folder a publish was replacing) are removed first: one output is built by one process at a time.
        """
        parent, _, name = rel.rstrip("/").rpartition("/")
        self.sweep_leftovers(rel)
        return f"{parent}/{STAGING}/{name}-{uuid.uuid4().hex[:8]}"

    def sweep_leftovers(self, rel: str) -> list[str]:
        """Delete what a killed build or publish of ``rel`` left under ``<parent>/.staging``; returns them."""
        parent, _, name = rel.rstrip("/").rpartition("/")
        mine = re.compile(re.escape(name) + r"(-|\.old-)[0-9a-f]{8}")
        gone = [d for d in self.list_all_dirs(f"{parent}/{STAGING}") if mine.fullmatch(d)]
        for d in gone:
            log.warning("removing %s/%s/%s, left by an interrupted build", parent, STAGING, d)
            self.delete_dir(f"{parent}/{STAGING}/{d}")
        return gone

    def list_all_dirs(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory)

    def publish_dir(self, staging: str, final: str) -> None:
        """Make a fully written staging folder (manifest included) the final one.

        Local: two renames, so ``final`` is either the old complete folder, missing, or the new complete
        folder. S3 has no rename: the old manifest is deleted first, objects are copied, and the manifest
        is copied last, so an interrupted publish leaves a folder without a manifest (incomplete).
        """
        if self.is_local:
            final_p, staging_p = self.path(final), self.path(staging)
            trash = None
            if os.path.exists(final_p):
                # the old folder waits in the hidden staging folder, never beside the final one, where a
                # kill between the two renames would leave it looking like one more complete output
                parent, _, name = final.rstrip("/").rpartition("/")
                trash = self.path(f"{parent}/{STAGING}/{name}.old-{uuid.uuid4().hex[:8]}")
                os.makedirs(os.path.dirname(trash), exist_ok=True)
                os.replace(final_p, trash)
            os.makedirs(os.path.dirname(final_p), exist_ok=True)
            os.replace(staging_p, final_p)
            if trash:
                self.fs.delete_dir(trash)
            return
        if self.exists(f"{final}/{MANIFEST}"):
            self.fs.delete_file(self.path(f"{final}/{MANIFEST}"))
        self.delete_dir(final)
        names = [i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.path(staging)))]
        for name in sorted(names, key=lambda n: n == MANIFEST):  # manifest last
            self.fs.copy_file(self.path(f"{staging}/{name}"), self.path(f"{final}/{name}"))
        self.delete_dir(staging)

    # -- parquet -----------------------------------------------------------------------------------
    def write_parquet(
        self, rel: str, table: pa.Table, compression: str = "zstd", checksum: str = "sha256"
    ) -> dict[str, Any]:
        """Write ``table`` (zstd; intermediates read once may pass a cheaper codec and checksum) in row
        groups of ``ROW_GROUP_ROWS`` rows and return what a manifest records of the file: ``bytes`` and its
        checksum (:func:`checksum`)."""
        from kalm.core.schema import REPEATED_COLUMNS

        # row tables: a dictionary only for the repeated columns (the texts would fall back to plain anyway)
        dictionary = (
            [c for c in REPEATED_COLUMNS if c in table.column_names]
            if "query" in table.column_names
            else True
        )
        sink = pa.BufferOutputStream()
        pq.write_table(
            table, sink, compression=compression, row_group_size=ROW_GROUP_ROWS, use_dictionary=dictionary
        )
        data = sink.getvalue()
        self.write_bytes(rel, data)
        return {"bytes": data.size, **file_checksum(data, checksum)}

    def read_bytes_checked(self, rel: str, entry: dict[str, Any]) -> bytes:
        """The bytes of a file a manifest lists, verified against the ``bytes``/``sha256`` it recorded
        (entries without a checksum, from manifests written before them, are read unverified). A mismatch
        or an unreadable file is a one-line KalmError."""
        try:
            data = self.read_bytes(rel)
        except (OSError, FileNotFoundError) as err:
            raise KalmError(
                f"{self.full_uri(rel)} is listed in its manifest but cannot be read: {err}"
            ) from None
        if digest_of(entry) is None:
            return data
        why = None
        if len(data) != entry.get("bytes", len(data)):
            why = f"{len(data)} bytes, the manifest says {entry['bytes']}"
        elif not checksum_matches(data, entry):
            why = "its checksum differs from the manifest's"
        if why:
            raise KalmError(
                f"{self.full_uri(rel)} changed after it was written ({why}): rebuild it (--force)"
            )
        return data

    def read_parquet_checked(
        self, rel: str, entry: dict[str, Any], columns: list[str] | None = None
    ) -> pa.Table:
        """Read a Parquet file a manifest lists, verified as :meth:`read_bytes_checked` does."""
        if digest_of(entry) is None:
            return self.read_parquet(rel, columns=columns)
        return pq.read_table(pa.BufferReader(self.read_bytes_checked(rel, entry)), columns=columns)

    def files_intact(self, rel: str, files: list[dict[str, Any]]) -> str | None:
        """Cheap check that a manifest's files are all there at their recorded sizes: ``None`` or what is
        wrong (a stage must not call a truncated or missing file a cache hit)."""
        sized = [f for f in files if "bytes" in f]
        if not sized:
            return None
        infos = self.fs.get_file_info([self.path(f"{rel}/{f['name']}") for f in sized])
        for f, info in zip(sized, infos, strict=True):
            if info.type == pafs.FileType.NotFound:
                return f"{f['name']} is missing"
            if info.size != f["bytes"]:
                return f"{f['name']} is {info.size} bytes, the manifest says {f['bytes']}"
        return None

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)

    def iter_parquet_batches(
        self, rel: str, batch_size: int = 8192, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        with self.fs.open_input_file(self.path(rel)) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


# File checksums a manifest records. Published files (shards, mixtures, models) carry sha256, what a user
# can check with sha256sum; intermediates of one stage (work units' files, read back once or twice) carry
# xxh3_128, ~20x faster on a CPU: it guards against truncation and bit rot, not against a forger.
CHECKSUMS = ("sha256", "xxh3_128")


def file_checksum(data: bytes | pa.Buffer | memoryview, algo: str = "sha256") -> dict[str, str]:
    """``{algo: hex digest}`` of ``data`` (``sha256`` or ``xxh3_128``)."""
    if algo == "sha256":
        return {"sha256": hashlib.sha256(data).hexdigest()}
    if algo == "xxh3_128":
        import xxhash

        return {"xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    raise ValueError(f"unknown checksum {algo!r} (known: {', '.join(CHECKSUMS)})")


def digest_of(entry: dict[str, Any]) -> str | None:
    """The checksum a manifest entry records, whichever algorithm wrote it (None: none recorded)."""
    return next((entry[k] for k in CHECKSUMS if entry.get(k)), None)


def checksum_matches(data: bytes | pa.Buffer, entry: dict[str, Any]) -> bool:
    """Whether ``data`` has the checksum ``entry`` records (sha256 may be recorded as a prefix: mining
    records 16 digits)."""
    for algo in CHECKSUMS:
        if entry.get(algo):
            return file_checksum(data, algo)[algo].startswith(entry[algo])
    return True


def read_manifest(root: DataRoot, rel: str) -> dict[str, Any] | None:
    """The manifest of a finished folder, or None when the folder is missing or incomplete."""
    return root.read_json(f"{rel}/{MANIFEST}") if root.exists(f"{rel}/{MANIFEST}") else None


def read_rows(root: DataRoot, rel: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a finished folder, through its manifest (never a glob: stray files are ignored)."""
    from kalm.core.schema import ROW_SCHEMA

    m = read_manifest(root, rel)
    if m is None:
        raise KalmError(f"{root.full_uri(rel)} is missing or incomplete (no {MANIFEST}); run its stage first")
    tables = [root.read_parquet_checked(f"{rel}/{f['name']}", f, columns=columns) for f in m["files"]]
    if not tables:
        schema = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


# -- plain data files (local tasks, dev sets) ------------------------------------------------------
DATA_SUFFIXES = (".parquet", ".jsonl")


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if path.startswith("s3://"):
        parsed = urlparse(path)
        return s3_filesystem(), (parsed.netloc + parsed.path).rstrip("/")
    return pafs.LocalFileSystem(), str(Path(path).expanduser())


def data_files(path: str, what: str = "data") -> tuple[pafs.FileSystem, list[str]]:
    """The data files behind ``path``: a file, a folder (its ``*.parquet``/``*.jsonl``), a local glob or
    ``s3://``; ``what`` names them in errors."""
    fs, p = _filesystem(path)
    if any(c in p for c in "*?[") and isinstance(fs, pafs.LocalFileSystem):
        files = sorted(f for f in glob.glob(p) if f.endswith(DATA_SUFFIXES))
    else:
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise KalmError(f"{what} not found (no such file or folder): {path}")
        if info.type == pafs.FileType.Directory:
            sel = pafs.FileSelector(p, recursive=True)
            files = sorted(
                i.path
                for i in fs.get_file_info(sel)
                if i.is_file
                and i.base_name.endswith(DATA_SUFFIXES)
                and not i.base_name.startswith(("_", "."))
            )
        else:
            files = [p]
    if not files:
        raise KalmError(f"no *.parquet or *.jsonl files at {path}")
    return fs, files


def read_table(path: str, what: str = "data") -> pa.Table:
    """All rows at ``path`` (Parquet or JSONL files, see :func:`data_files`) as one table."""
    import pyarrow.json as pajson

    fs, files = data_files(path, what)
    tables = []
    for f in files:
        try:
            if f.endswith(".parquet"):
                tables.append(pq.read_table(f, filesystem=fs))
            else:
                with fs.open_input_stream(f) as stream:
                    tables.append(pajson.read_json(stream))
        except (pa.ArrowInvalid, OSError) as err:
            raise KalmError(f"cannot read {f}: {err}") from None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as err:
        raise KalmError(f"files at {path} have incompatible columns: {err}") from None
