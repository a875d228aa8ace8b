"""An S3-compatible server on 127.0.0.1 for the tests: moto's server mode in a subprocess.

Credentials are the fake ones tests/conftest.py puts in the environment (moto accepts any);
every location names the server in its query (``?endpoint_override=127.0.0.1:PORT&scheme=http``),
as a user names their own S3-compatible store.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

BUCKET = "embcam-test"
START_LIMIT_S = 120  # a guard for a loaded machine; the server answers in about a second


class S3Server:
    """A running moto server: its endpoint, URIs on it and a filesystem to put and read files."""

    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port = process, port
        self.endpoint = f"127.0.0.1:{port}"

    def uri(self, key: str) -> str:
        """``s3://BUCKET/key`` on this server."""
        return f"s3://{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self, **options) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", **options)

    def upload(self, folder: Path, prefix: str) -> None:
        """Every file under ``folder`` to ``BUCKET/prefix/<its relative path>``."""
        fs = self.filesystem()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with fs.open_output_stream(f"{BUCKET}/{prefix}/{path.relative_to(folder).as_posix()}") as f:
                f.write(path.read_bytes())

    def read(self, key: str) -> bytes:
        with self.filesystem().open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read()

    def keys(self, prefix: str) -> list[str]:
        """The keys of the files under ``prefix`` (recursively)."""
        found = self.filesystem().get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True))
        return sorted(f.path[len(BUCKET) + 1:] for f in found if f.type == pafs.FileType.File)

    def stop(self) -> None:
        """End the server process (by its pid) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_s3_server() -> S3Server:
    """Start moto's server on a free port of 127.0.0.1, wait until it answers, make the bucket."""
    port = free_port()
    log = tempfile.TemporaryFile()  # its request log: read only if it fails to start
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(process, port)
    deadline = time.monotonic() + START_LIMIT_S
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto server exited with {process.returncode}: "
                               f"{log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{server.endpoint}/moto-api/", timeout=5):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"moto server on {server.endpoint} did not answer in {START_LIMIT_S} s") from None
            time.sleep(0.05)
    log.close()  # the server keeps its own descriptor
    server.filesystem(allow_bucket_creation=True).create_dir(BUCKET)
    return server
