"""The run folder (``--out``): what the explain job writes, how it resumes, and how a
finished run is told from an unfinished one. No Ray here.

Layout::

    OUT/results/part-<start>-<stop>.parquet   result rows of manifest rows [start, stop)
    OUT/maps/part-<start>-<stop>.parquet      their E maps (--keep-maps, --pairs), written first
    OUT/pairs/part-<start>-<stop>.parquet     pair explanations of pairs-file rows [start, stop)
    OUT/proxies.parquet                        class proxies (mean and bank runs)
    OUT/summary.json                           written only when the run is complete ...
    OUT/_SUCCESS                               ... and then this marker, last of all
    OUT/sanity/                                embcam sanity's checks of this run
    OUT/_embcam/run.json                       the run's identity and run id (written first)
    OUT/_embcam/lease.json                     the driver writing the run now (embcam.job.lifecycle)
    OUT/_embcam/manifest/part-<k>.parquet      the validated manifest, cut into row groups
    OUT/_embcam/partials/part-<start>-<stop>.parquet  mean-proxy pass 1: per-class sums
    OUT/_embcam/attempts/                      worker-death markers of this attempt (embcam.job.attempts)

Every data file is named by the manifest rows it holds and is committed whole: written
under a hidden temporary name and renamed (local disks), or put in one request (object
stores, where an object only appears once complete). A retried piece rewrites the same
name, so rows are written exactly once; resume lists the names and computes only the
rows no piece covers. ``_SUCCESS`` absent but ``run.json`` present means unfinished.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..faults import fault_point
from .locations import has_scheme

RESULTS, PROXIES, SUMMARY, DONE, STATE = "results", "proxies.parquet", "summary.json", "_SUCCESS", "_embcam"
PARTIALS, ATTEMPTS, MANIFEST, IDENTITY = "partials", "attempts", "manifest", "run.json"
MAPS, PAIRS, SANITY = "maps", "pairs", "sanity"
# everything embcam writes in --out; nothing else is touched
OWNED = (RESULTS, MAPS, PAIRS, PROXIES, SUMMARY, DONE, STATE, SANITY)
_PIECE = re.compile(r"^part-(\d+)-(\d+)\.parquet$")


class RunMismatch(ValueError):
    """``--out`` holds a run with another configuration."""


class RunWriteError(OSError):
    """A write into the run folder failed (full disk, permissions, a store's refusal).
    ``file`` (its path inside the run folder) and ``reason`` are attributes of their own,
    which survive pickling and Ray Data's rewriting of an exception's arguments."""

    file: str | None = None
    reason: str | None = None

    @classmethod
    def of(cls, exc: OSError, file: str) -> RunWriteError:
        error = cls(exc.errno, exc.strerror or str(exc), file)
        error.file, error.reason = file, exc.strerror or str(exc)
        return error


class RunFolder:
    """``--out`` on its filesystem (local path or URI). Picklable: workers rebuild the filesystem."""

    def __init__(self, out: str):
        self.out = out
        self.fs, self.path = filesystem_path(out)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):
        return RunFolder, (self.out,)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pafs.FileType.NotFound

    # --- writing, always whole ----------------------------------------------------------

    def write_bytes(self, data: bytes, *parts: str, durable: bool = True) -> None:
        """Put ``data`` at ``parts``: temporary name + rename on a local disk, one PUT elsewhere.
        ``durable``: flushed to the disk first, so that a machine crash cannot leave a
        committed but empty file (a process crash cannot: the kernel keeps its writes).
        A failed write raises RunWriteError and leaves no temporary behind."""
        path = self.join(*parts)
        try:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            if self.local:
                self._write_local(data, path, durable)
            else:
                fault_point("write", [parts[-1]])
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
        except OSError as exc:
            raise RunWriteError.of(exc, "/".join(parts)) from exc

    @staticmethod
    def _write_local(data: bytes, path: str, durable: bool) -> None:
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"  # hidden: readers skip dot files
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                fault_point("write", [name])
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk leaves no half-written file behind
                os.remove(tmp)
            raise

    def write_table(self, table: pa.Table, *parts: str, **options) -> None:
        """``table`` as one Parquet file at ``parts`` (``options``: ``pq.write_table``'s)."""
        sink = io.BytesIO()
        pq.write_table(table, sink, **options)
        self.write_bytes(sink.getvalue(), *parts)

    def write_tables(self, schema: pa.Schema, tables, *parts: str) -> int:
        """``tables``, one after another, as one Parquet file at ``parts``, holding one of
        them in memory at a time; returns the rows written. The file appears whole or not at
        all: written under a temporary name, then moved (a rename on a local disk, a copy on
        an object store); an exception from ``tables`` leaves nothing behind."""
        path = self.join(*parts)
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"  # hidden: readers skip dot files
        rows = 0
        try:
            self.fs.create_dir(folder, recursive=True)
            with self.fs.open_output_stream(tmp) as sink, pq.ParquetWriter(sink, schema) as writer:
                for table in tables:
                    writer.write_table(table)
                    rows += table.num_rows
            fault_point("write", [name])
            if self.local:  # flushed to the disk before the rename, as write_bytes does
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            self.fs.move(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            if isinstance(exc, OSError):
                raise RunWriteError.of(exc, "/".join(parts)) from exc
            raise
        return rows

    def write_json(self, value: dict, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=2, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> dict | None:
        if not self.exists(*parts):
            return None
        with self.fs.open_input_stream(self.join(*parts)) as f:
            return json.loads(f.read())

    def delete(self, *parts: str) -> None:
        path = self.join(*parts)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif info.type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    def clear(self, keep: str | None = None) -> None:
        """Remove everything embcam wrote here (and only that); ``keep``: a file of the run
        state that stays (the lease of the driver that clears)."""
        for name in OWNED:
            if name != STATE or keep is None:
                self.delete(name)
        for info in self.listing(STATE) if keep is not None else []:
            if info.base_name != keep:
                self.delete(STATE, info.base_name)

    def drop_temporaries(self, *parts: str) -> None:
        """Hidden half-written files left by a crash (never read, but not kept either)."""
        for info in self.listing(*parts):
            if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                self.fs.delete_file(info.path)

    # --- what has been committed ----------------------------------------------------------

    def pieces(self, *parts: str) -> list[tuple[int, int]]:
        """The [start, stop) row ranges of the committed ``part-<start>-<stop>.parquet`` files."""
        found = []
        for info in self.listing(*parts):
            match = _PIECE.match(info.base_name)
            if match and info.type == pafs.FileType.File:
                found.append((int(match.group(1)), int(match.group(2))))
        return sorted(found)

    def piece_paths(self, *parts: str) -> list[str]:
        return [self.join(*parts, piece_name(a, b)) for a, b in self.pieces(*parts)]

    def listing(self, *parts: str) -> list[pafs.FileInfo]:
        if not self.exists(*parts):
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.join(*parts)))

    # --- run state ----------------------------------------------------------------------------

    @property
    def identity(self) -> dict | None:
        return self.read_json(STATE, IDENTITY)

    def is_complete(self) -> bool:
        return self.exists(DONE)

    def holds_work(self) -> bool:
        """True when an earlier attempt committed anything worth keeping."""
        return bool(self.pieces(RESULTS) or self.pieces(STATE, PARTIALS) or self.exists(PROXIES))


def filesystem_path(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or a URI."""
    if has_scheme(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def file_sha256(uri: str | None) -> str | None:
    """SHA-256 of a local file or object (None for None), read in 1 MiB chunks."""
    if uri is None:
        return None
    fs, path = filesystem_path(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def piece_name(start: int, stop: int) -> str:
    return f"part-{start:012d}-{stop:012d}.parquet"


def covered(pieces: list[tuple[int, int]], total: int) -> int:
    """Rows of [0, total) the pieces cover; raises if two pieces overlap (never expected:
    every row has one home, so an overlap means a bug, and counting it twice would lie)."""
    rows, end = 0, 0
    for start, stop in sorted(pieces):
        if start < end:
            raise RuntimeError(f"result pieces overlap at rows {start}-{min(stop, end)}: "
                               "the run folder was written by two jobs at once?")
        if not 0 <= start < stop <= total:
            raise RuntimeError(f"result piece rows {start}-{stop} are outside the manifest's {total} rows")
        rows, end = rows + stop - start, stop
    return rows


def pending_blocks(pieces: list[tuple[int, int]], total: int, block_rows: int) -> list[tuple[int, int]]:
    """The row ranges no piece covers, cut at multiples of ``block_rows``."""
    todo, at = [], 0
    for start, stop in sorted(pieces) + [(total, total)]:
        todo += _cut(at, start, block_rows)
        at = max(at, stop)
    return todo


def _cut(start: int, stop: int, block_rows: int) -> list[tuple[int, int]]:
    out = []
    while start < stop:
        end = min(stop, (start // block_rows + 1) * block_rows)
        out.append((start, end))
        start = end
    return out


def identity_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every identity entry that differs (nested dicts flattened)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


FILE_BLOCKS = 256  # blocks per file of the manifest copy: small footers, few files


class ManifestCopy:
    """The validated manifest, copied into the run folder so that any worker can read any
    block's rows cheaply: files of ``FILE_BLOCKS`` blocks, one row group per block. A
    resumed run reads this copy; the original only has to hash the same."""

    def __init__(self, run: RunFolder, block_rows: int):
        self.run, self.block_rows, self.file_rows = run, block_rows, block_rows * FILE_BLOCKS
        self._writer: pq.ParquetWriter | None = None
        self._file: pa.NativeFile | None = None
        self._rows = 0
        self._open: dict[int, pq.ParquetFile] = {}

    def __reduce__(self):
        return ManifestCopy, (self.run, self.block_rows)

    def _path(self, k: int) -> str:
        return self.run.join(STATE, MANIFEST, f"part-{k:06d}.parquet")

    def write(self, table: pa.Table) -> None:
        """Append validated manifest rows (the scan's sink)."""
        while table.num_rows:
            k, used = divmod(self._rows, self.file_rows)
            if used == 0:
                self.close()
                self.run.fs.create_dir(self.run.join(STATE, MANIFEST), recursive=True)
                self._file = self.run.fs.open_output_stream(self._path(k))
                self._writer = pq.ParquetWriter(self._file, table.schema)
            assert self._writer is not None  # opened above, at the start of each file
            take = min(table.num_rows, self.file_rows - used)
            self._writer.write_table(table.slice(0, take), row_group_size=self.block_rows)
            table, self._rows = table.slice(take), self._rows + take

    def close(self) -> None:
        if self._writer is not None and self._file is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None

    def read(self, start: int, stop: int) -> pa.Table:
        """Manifest rows [start, stop) with their row number in a ``row`` column."""
        parts = []
        for k in range(start // self.file_rows, (stop - 1) // self.file_rows + 1):
            base = k * self.file_rows
            a, b = max(start, base) - base, min(stop, base + self.file_rows) - base
            if k not in self._open:
                parquet = pq.ParquetFile(self.run.fs.open_input_file(self._path(k)))
                sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
                self._open[k] = (parquet, np.cumsum([0] + sizes))
            parquet, offsets = self._open[k]
            first = int(np.searchsorted(offsets, a, side="right")) - 1
            last = int(np.searchsorted(offsets, b, side="left")) - 1
            table = parquet.read_row_groups(list(range(first, last + 1)))
            parts.append(table.slice(a - int(offsets[first]), b - a))
        table = pa.concat_tables(parts)
        return table.append_column("row", pa.array(np.arange(start, stop), pa.int64()))
