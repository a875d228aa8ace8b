"""embcam.data.fetch: reading one file safely: special files, size caps, timeouts, confinement."""

import functools
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pytest

import embcam.data.fetch as fetch
from embcam.data.fetch import FetchError, OutsideAllowedPrefixes, ReadLimits, check_allowed, read_bytes
from embcam.data.locations import resolve_uri

SECRET = b"secret-user:x:0:0:TOPSECRET-d41d8cd9:/home/secret-user:/bin/sh\n"


def run_with_deadline(function, seconds: float):
    """``function()``'s outcome (value or exception); fails the test if it is still running."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    return outcome


@pytest.fixture
def fresh_filesystems(monkeypatch):
    monkeypatch.setattr(fetch, "_FILESYSTEMS", {})


# --- local files and file:// URIs --------------------------------------------------------------


def test_read_bytes_local_and_file_uris(tmp_path):
    (tmp_path / "one.bin").write_bytes(b"\x00one")
    (tmp_path / "two words.bin").write_bytes(b"two")
    assert read_bytes(str(tmp_path / "one.bin")) == b"\x00one"
    assert read_bytes(f"file://{tmp_path}/one.bin") == b"\x00one"
    uri = resolve_uri("two words.bin", f"file://{tmp_path}")
    assert uri.endswith("two%20words.bin")
    assert read_bytes(uri) == b"two"
    assert read_bytes(str(tmp_path / "one.bin"), ReadLimits(max_bytes=4)) == b"\x00one"


def test_errors_name_the_uri(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        read_bytes(str(tmp_path / "nope.jpg"))
    with pytest.raises(FileNotFoundError, match=r"file://.*nope\.jpg"):
        read_bytes(f"file://{tmp_path}/nope.jpg")
    with pytest.raises(FetchError, match=r"cannot read foo://x/y.jpg"):
        read_bytes("foo://x/y.jpg")


@pytest.mark.parametrize("as_uri", [False, True])
def test_file_over_max_bytes_is_refused(tmp_path, as_uri):
    path = tmp_path / "big.bin"
    path.write_bytes(SECRET * 100)
    uri = f"file://{path}" if as_uri else str(path)
    size = len(SECRET) * 100
    assert read_bytes(uri, ReadLimits(max_bytes=size)) == SECRET * 100
    with pytest.raises(FetchError, match=rf"cannot read {uri}: file is {size:,} bytes, over the "
                                         rf"limit of {size - 1:,} bytes \(--max-bytes\)") as error:
        read_bytes(uri, ReadLimits(max_bytes=size - 1))
    assert "TOPSECRET" not in str(error.value) and "secret-user" not in str(error.value)


def test_dev_zero_is_refused_at_once():
    for uri in ("/dev/zero", "file:///dev/zero"):  # the type is checked before a byte is read
        with pytest.raises(FetchError, match=r"/dev/zero: not a regular file \(character device\)"):
            read_bytes(uri)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody ever writes: a blocking open or read would wait forever
    for uri in (str(fifo), f"file://{fifo}"):
        outcome = run_with_deadline(functools.partial(read_bytes, uri), 60)  # a guard: a blocked open never returns
        assert isinstance(outcome.get("error"), FetchError), outcome
        assert "not a regular file (FIFO)" in str(outcome["error"])


def test_directory_and_socket_are_refused(tmp_path):
    with pytest.raises(FetchError, match=r"not a regular file \(directory\)"):
        read_bytes(str(tmp_path))
    with pytest.raises(FetchError, match=r"file://.*not a regular file \(directory\)"):
        read_bytes(f"file://{tmp_path}")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s.jpg"))
    try:
        with pytest.raises(OSError, match=r"s\.jpg"):  # cannot even be opened (ENXIO)
            read_bytes(str(tmp_path / "s.jpg"))
    finally:
        server.close()


def test_error_messages_never_quote_the_file(tmp_path):
    path = tmp_path / "passwd"
    path.write_bytes(SECRET * 3)
    for limits in (ReadLimits(max_bytes=10), ReadLimits(allowed_prefixes=(str(tmp_path / "x"),))):
        with pytest.raises(OSError) as error:
            read_bytes(str(path), limits)
        assert "TOPSECRET" not in str(error.value) and "secret-user" not in str(error.value)


def test_read_limits_are_checked():
    with pytest.raises(ValueError, match="invalid read limits"):
        ReadLimits(retries=-1)
    with pytest.raises(ValueError, match="invalid read limits"):
        ReadLimits(read_timeout=0)


# --- remote URIs: size cap, timeouts, retries --------------------------------------------------


@pytest.fixture
def mock_store(monkeypatch):
    """One pyarrow in-memory filesystem behind every mock:// uri (from_uri makes a new one
    each time)."""
    fs = pafs.FileSystem.from_uri("mock:///")[0]
    monkeypatch.setattr(fetch, "_filesystem_path",
                        lambda uri, timeout=None: (fs, urlsplit(uri).path.lstrip("/")))
    return fs


def test_remote_read_and_size_cap(mock_store):
    mock_store.create_dir("bucket/dir")
    with mock_store.open_output_stream("bucket/dir/a.bin") as stream:
        stream.write(SECRET * 10)
    uri, size = "mock:///bucket/dir/a.bin", len(SECRET) * 10
    assert read_bytes(uri, ReadLimits(max_bytes=size)) == SECRET * 10
    with pytest.raises(FetchError, match=rf"mock:///bucket/dir/a.bin: file is {size} bytes, over "
                                         rf"the limit of {size - 1} bytes") as error:
        read_bytes(uri, ReadLimits(max_bytes=size - 1))
    assert "TOPSECRET" not in str(error.value)


def test_remote_not_found_is_not_retried(mock_store, monkeypatch):
    calls = []
    once = fetch._read_remote_once
    monkeypatch.setattr(fetch, "_read_remote_once", lambda *a: (calls.append(1), once(*a))[1])
    with pytest.raises(FileNotFoundError, match=r"mock:///bucket/nope.jpg"):
        read_bytes("mock:///bucket/nope.jpg", ReadLimits(retries=3))
    assert len(calls) == 1  # one attempt: no retry, so no back-off either


def flaky(monkeypatch, errors: list):
    """Make each remote attempt raise the next of ``errors``, then succeed; count attempts."""
    calls = []

    def attempt(uri, limits):
        calls.append(uri)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return b"data"

    monkeypatch.setattr(fetch, "_read_remote_once", attempt)
    monkeypatch.setattr(fetch, "_BACKOFF_S", 0.01)
    return calls


def test_transient_errors_are_retried(monkeypatch):
    network = OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")
    calls = flaky(monkeypatch, [network, OSError("google::cloud::Status(UNAVAILABLE: ...)")])
    assert read_bytes("s3://bucket/k.jpg", ReadLimits(retries=2)) == b"data"
    assert len(calls) == 3
    calls = flaky(monkeypatch, [network] * 3)
    with pytest.raises(FetchError, match=r"cannot read s3://bucket/k.jpg \(3 attempts\): AWS Error "
                                         r"NETWORK_CONNECTION"):
        read_bytes("s3://bucket/k.jpg", ReadLimits(retries=2))
    assert len(calls) == 3


def test_permanent_errors_are_not_retried(monkeypatch):
    denied = OSError("AWS Error ACCESS_DENIED during HeadObject operation: Access Denied")
    calls = flaky(monkeypatch, [denied])
    with pytest.raises(FetchError, match=r"cannot read s3://bucket/k.jpg: AWS Error ACCESS_DENIED"):
        read_bytes("s3://bucket/k.jpg", ReadLimits(retries=3))
    assert len(calls) == 1


def test_a_hanging_attempt_times_out_and_is_retried(monkeypatch):
    calls = []
    monkeypatch.setattr(fetch, "_read_remote_once", lambda uri, limits: (calls.append(1),
                                                                        time.sleep(30)))
    monkeypatch.setattr(fetch, "_BACKOFF_S", 0.01)
    with pytest.raises(TimeoutError, match=r"cannot read gs://b/k.jpg \(3 attempts\): timed out "
                                           r"after 0.2 s"):
        read_bytes("gs://b/k.jpg", ReadLimits(read_timeout=0.2, retries=2))
    assert len(calls) == 3  # each 30 s attempt was abandoned at its timeout (the message) and retried


def closed_port() -> int:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_s3_endpoint_is_bounded(fresh_filesystems, monkeypatch):
    # Explicit credentials in the URI and no instance metadata: nothing is looked up
    # anywhere but 127.0.0.1.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = f"s3://key:secret@bucket/k.jpg?endpoint_override=127.0.0.1:{closed_port()}&scheme=http"
    limits = ReadLimits(read_timeout=1.0, retries=2)
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"cannot read s3://.*k\.jpg.* \(3 attempts\): "):
        read_bytes(uri, limits)
    # 3 attempts of at most 1 s and back-off 0.5 s + 1 s: 4.5 s; a guard far above that, far below
    # what an unbounded read would take, so a loaded machine never fails it
    assert time.perf_counter() - start < 60


def test_filesystems_get_network_timeouts(fresh_filesystems):
    fs, path = fetch._filesystem_path("s3://bucket/k.jpg?endpoint_override=127.0.0.1:9", 7.0)
    assert path == "bucket/k.jpg"
    options = fs.__reduce__()[1][0]
    assert options["connect_timeout"] == 7.0 and options["request_timeout"] == 7.0
    assert options["endpoint_override"] == "127.0.0.1:9"
    fs, _ = fetch._filesystem_path("gs://bucket/k.jpg?endpoint_override=127.0.0.1:9", 7.0)
    assert fs.__reduce__()[1][0]["retry_time_limit"].total_seconds() == 7


def test_cached_filesystem_paths_match_from_uri(fresh_filesystems):
    # Filesystems are cached per (scheme, host, query, timeout); later URIs must map to the
    # same paths pyarrow itself would give. Building these filesystems needs no network.
    uris = ["gs://bucket/a/b.jpg", "gs://bucket/c%20d/e%2Bf.jpg", "gs://other/x.png",
            "s3://bucket/k/1.jpg?region=eu-west-1", "s3://bucket/k%23/2.jpg?region=eu-west-1",
            "file:///tmp/a.jpg", "file:///var/x%20y.jpg"]
    for uri in uris:
        assert fetch._filesystem_path(uri)[1] == pafs.FileSystem.from_uri(uri)[1], uri
    assert len(fetch._FILESYSTEMS) == 4
    assert fetch._filesystem_path("gs://bucket/z")[1] == "bucket/z"


# --- confinement ---------------------------------------------------------------------------------


def test_local_confinement(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    (outside / "secret.txt").write_bytes(SECRET)
    (root / "link.jpg").symlink_to(outside / "secret.txt")
    (root / "linked_dir").symlink_to(outside)
    limits = ReadLimits(allowed_prefixes=(str(root),))

    assert read_bytes(str(root / "a.jpg"), limits) == b"a"
    assert read_bytes(f"file://{root}/a.jpg", limits) == b"a"
    assert read_bytes(str(root / "sub" / ".." / "a.jpg"), limits) == b"a"
    check_allowed(str(root), (str(root),))
    for escape in (str(root / ".." / "private" / "secret.txt"),  # ../
                   resolve_uri("../private/secret.txt", str(root)),
                   str(root / "link.jpg"), str(root / "linked_dir" / "secret.txt"),  # symlinks
                   str(outside / "secret.txt"), "/etc/passwd",  # absolute paths outside
                   f"file://{outside}/secret.txt", str(tmp_path / "images2" / "a.jpg")):
        with pytest.raises(OutsideAllowedPrefixes, match="uri outside the allowed prefixes"):
            read_bytes(escape, limits)
    assert issubclass(OutsideAllowedPrefixes, PermissionError)
    assert issubclass(OutsideAllowedPrefixes, ValueError)
    # an outside file that does not exist is refused as well, before anything is opened
    with pytest.raises(OutsideAllowedPrefixes):
        read_bytes(str(outside / "nope"), limits)


def test_uri_confinement():
    prefixes = ("s3://bucket/images/", "gs://other")
    for inside in ("s3://bucket/images/a.jpg", "S3://bucket/images/sub/b%20c.jpg",
                   "s3://bucket/images/x/../a.jpg", "gs://other/anything.png"):
        check_allowed(inside, prefixes)
    for outside in ("s3://bucket/images2/a.jpg", "s3://bucket/other/a.jpg",
                    "s3://bucket/images/../secret.txt", "s3://bucket/images/%2E%2E/secret.txt",
                    "s3://bucket2/images/a.jpg", "gs://bucket/images/a.jpg",
                    "s3://bucket/images/a.jpg?endpoint_override=evil.example:80",
                    "/bucket/images/a.jpg", "file:///bucket/images/a.jpg"):
        with pytest.raises(OutsideAllowedPrefixes):
            check_allowed(outside, prefixes)
    with pytest.raises(OutsideAllowedPrefixes):
        read_bytes("s3://bucket/secret.txt", ReadLimits(allowed_prefixes=prefixes))


def test_relative_uris_under_a_uri_root_with_a_query_stay_inside():
    root = "s3://bucket/images?endpoint_override=127.0.0.1:9000&scheme=http"
    uri = resolve_uri("a b/c.jpg", root)
    assert uri == "s3://bucket/images/a%20b/c.jpg?endpoint_override=127.0.0.1:9000&scheme=http"
    check_allowed(uri, (root,))
    with pytest.raises(OutsideAllowedPrefixes):
        check_allowed(resolve_uri("../c.jpg", root), (root,))
