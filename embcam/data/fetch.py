"""Reading the bytes of one catalog file, safely and within bounds.

Local paths (and ``file://`` URIs) are opened without blocking and read only when they are
regular files: a FIFO, a device such as /dev/zero, a directory or a socket is refused. Other
URIs (s3://, gs://, ...) go through pyarrow.fs, each attempt under a wall-clock timeout,
with a few retries after transient errors. Every read is capped at ``max_bytes``, and
:func:`check_allowed` can confine reads to a set of prefixes.

Error messages name the uri and the reason, never bytes of the file.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from embcam.data.locations import has_scheme

_CHUNK = 16 << 20
_BACKOFF_S, _MAX_BACKOFF_S = 0.5, 4.0
# pyarrow reports every remote failure as a plain OSError; these words mark the ones worth
# retrying (no connection, timeouts, throttling, server errors), as AWS and GCS spell them.
_TRANSIENT = re.compile(r"network_connection|curlcode|connect|timed? ?out|slow ?down|"
                        r"throttl|unavailable|internal_failure|deadline_exceeded|"
                        r"resource_exhausted|\b50[0234]\b", re.IGNORECASE)
_KINDS = {stat.S_IFDIR: "directory", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on reading one file: its size, its decoded pixels (for the decoder), the time
    per remote attempt, the retries after transient remote errors, and where reads may go
    (None: anywhere)."""

    max_bytes: int = 256 << 20
    max_pixels: int = 100_000_000
    read_timeout: float = 30.0
    retries: int = 3
    allowed_prefixes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.max_bytes < 0 or self.max_pixels < 1 or self.read_timeout <= 0 or self.retries < 0:
            raise ValueError(f"invalid read limits: {self}")


class FetchError(OSError):
    """A file could not be read or was refused; the message names the uri and the reason."""


class OutsideAllowedPrefixes(PermissionError, ValueError):
    """The uri lies outside every allowed prefix."""


def read_bytes(uri: str, limits: ReadLimits = ReadLimits()) -> bytes:
    """The content of ``uri``, a local path or a pyarrow-filesystem URI, within ``limits``.

    Raises FileNotFoundError when it does not exist, OutsideAllowedPrefixes outside
    ``limits.allowed_prefixes``, TimeoutError when every remote attempt timed out, and
    FetchError (an OSError) for anything else: not a regular file, over ``max_bytes``,
    a remote error.
    """
    if limits.allowed_prefixes is not None:
        check_allowed(uri, limits.allowed_prefixes)
    path = _local_path(uri)
    if path is not None:
        return _read_local(path, uri, limits.max_bytes)
    return _read_remote(uri, limits)


def check_allowed(resolved_uri: str, prefixes: tuple[str, ...]) -> None:
    """Raise OutsideAllowedPrefixes unless ``resolved_uri`` lies under one of ``prefixes``.

    Local paths and file:// URIs are compared after os.path.realpath, so neither ``..`` nor
    a symlink leads out. Other URIs are compared by scheme, bucket and path (percent-decoded,
    ``..`` resolved) on a "/" boundary, and must have the prefix's query: an
    ``endpoint_override`` there names another server.
    """
    where, path = _location(resolved_uri)
    for prefix in prefixes:
        prefix_where, prefix_path = _location(prefix)
        if where == prefix_where and (path == prefix_path
                                      or path.startswith(prefix_path.rstrip("/") + "/")):
            return
    raise OutsideAllowedPrefixes(f"cannot read {resolved_uri}: uri outside the allowed prefixes")


def _local_path(uri: str) -> str | None:
    """The local path of a plain path or a file:// URI on this host; None for other URIs."""
    if not has_scheme(uri):
        return uri
    parts = urlsplit(uri)
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost"):
        return unquote(parts.path)
    return None


def _location(uri: str) -> tuple[tuple, str]:
    """(where, normalised path) of a uri, for prefix comparisons."""
    path = _local_path(uri)
    if path is not None:
        return (), os.path.realpath(path)
    parts = urlsplit(uri)
    where = (parts.scheme.lower(), parts.netloc,
             tuple(sorted(parse_qsl(parts.query, keep_blank_values=True))))
    return where, posixpath.normpath("/" + unquote(parts.path).lstrip("/"))


def _check_size(uri: str, size: int, max_bytes: int, read: bool = False) -> None:
    """Refuse a file of ``size`` bytes (from its metadata, or as many as were ``read``)."""
    if size > max_bytes:
        what = f"more than {max_bytes:,}" if read else f"{size:,}"
        raise FetchError(f"cannot read {uri}: file is {what} bytes, over the limit of "
                         f"{max_bytes:,} bytes (--max-bytes)")


def _read_at_most(read, limit: int) -> bytes:
    """``read(n)`` chunks until end of file or until more than ``limit`` bytes came."""
    chunks, total = [], 0
    while total <= limit:
        chunk = read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _read_local(path: str, uri: str, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; it
    # changes nothing for the regular files that are then read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:  # named by the uri as given (file://...), not the local path
        raise type(exc)(exc.errno, exc.strerror, uri) from None
    try:
        info = os.fstat(fd)  # of what was opened, so nothing can be swapped in after a check
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "special file")
            raise FetchError(f"cannot read {uri}: not a regular file ({kind})")
        _check_size(uri, info.st_size, max_bytes)
        data = _read_at_most(lambda n: os.read(fd, n), max_bytes)  # it may have grown
    finally:
        os.close(fd)
    _check_size(uri, len(data), max_bytes, read=True)
    return data


def _read_remote(uri: str, limits: ReadLimits) -> bytes:
    """Attempts of :func:`_read_remote_once` under a timeout, retrying transient errors
    after 0.5 s, 1 s, 2 s, 4 s, 4 s, ..."""
    attempts = limits.retries + 1
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        try:
            return _call_with_timeout(lambda: _read_remote_once(uri, limits), limits.read_timeout)
        except (FetchError, FileNotFoundError):  # our own verdicts: final
            raise
        except TimeoutError:
            last, reason = TimeoutError, f"timed out after {limits.read_timeout:g} s"
        except (OSError, pa.ArrowException) as exc:
            if not _TRANSIENT.search(str(exc)):  # access denied, bad uri, ...
                raise FetchError(f"cannot read {uri}: {exc}") from None
            last, reason = FetchError, str(exc)
    # the count first: an error row keeps only the start of a long message
    raise last(f"cannot read {uri} ({attempts} attempt{'s' * (attempts > 1)}): {reason}")


def _read_remote_once(uri: str, limits: ReadLimits) -> bytes:
    fs, path = _filesystem_path(uri, limits.read_timeout)
    try:
        handle = fs.open_input_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(errno.ENOENT, f"no such file ({exc})", uri) from None
    with handle:
        _check_size(uri, handle.size(), limits.max_bytes)
        data = _read_at_most(handle.read, limits.max_bytes)
    _check_size(uri, len(data), limits.max_bytes, read=True)
    return data


def _call_with_timeout(function, timeout: float):
    """``function()``, or TimeoutError after ``timeout`` seconds.

    A pyarrow call cannot be cancelled, so it runs in a daemon thread that is abandoned on
    timeout: it ends when the call does (the filesystem's own network timeouts bound that)
    and never holds up the process's exit.
    """
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="embcam-read", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# Filesystems are built once per (scheme, host, query, timeout): building an S3 one may cost
# a network round trip (region lookup). The first URI teaches how its paths map onto the
# filesystem (s3://bucket/key -> "bucket" + "/key"); where that mapping is not a plain
# prefix, every URI goes through from_uri.
_FILESYSTEMS: dict[tuple[str, str, str, float], tuple[pafs.FileSystem, str]] = {}


def _filesystem_path(uri: str, timeout: float = ReadLimits.read_timeout
                     ) -> tuple[pafs.FileSystem, str]:
    parts = urlsplit(uri)
    key, url_path = (parts.scheme, parts.netloc, parts.query, timeout), unquote(parts.path)
    if key in _FILESYSTEMS:
        fs, prefix = _FILESYSTEMS[key]
        return fs, prefix + url_path
    fs, path = pafs.FileSystem.from_uri(uri)
    fs = with_timeouts(fs, timeout)
    if path.endswith(url_path):
        _FILESYSTEMS[key] = (fs, path[:len(path) - len(url_path)])
    return fs, path


def with_timeouts(fs: pafs.FileSystem, timeout: float) -> pafs.FileSystem:
    """``fs`` rebuilt with network timeouts of ``timeout`` s where pyarrow has them.

    A URI cannot set S3's connect and request timeouts (pyarrow rejects them in the query),
    and GCS retries for 15 minutes unless the URI says otherwise; the filesystem's own
    options (its pickle state) are reused with these set.
    """
    if isinstance(fs, getattr(pafs, "S3FileSystem", ())):  # absent from pyarrow builds without S3
        rebuild, (options,) = fs.__reduce__()
        return rebuild({**options, "connect_timeout": timeout, "request_timeout": timeout})
    if isinstance(fs, getattr(pafs, "GcsFileSystem", ())):
        rebuild, (options,) = fs.__reduce__()
        if options["retry_time_limit"] is None:
            return rebuild({**options, "retry_time_limit": timedelta(seconds=timeout)})
    return fs
