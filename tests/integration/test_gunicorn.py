"""The middleware under a real gunicorn: a 256 MiB file streams with flat worker memory."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DOMAIN, require_module
from integration._gunicorn import GunicornServer, run_gunicorn
from wiretools import PatternFile, pattern_md5

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS

require_module("gunicorn")

SIZE = 256 * 1024 * 1024
MIB = 1024 * 1024


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def gunicorn(devmogile: DevMogileFS) -> Iterator[GunicornServer]:
    with run_gunicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]}) as server:
        yield server


def test_a_256_mib_file_streams_with_flat_worker_memory(devmogile: DevMogileFS, gunicorn: GunicornServer) -> None:
    port = gunicorn.port
    client = Client(DOMAIN, devmogile.trackers, storage_timeout=60)
    client.store_file("big.bin", PatternFile(SIZE), cls="thumb")
    client.store_content("small.txt", b"warm-up", cls="thumb")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/mogilefs/small.txt")
    assert connection.getresponse().read() == b"warm-up"
    [worker] = gunicorn.worker_pids()
    Path(f"/proc/{worker}/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    before = memory_kib(worker, "VmRSS")

    connection.request("GET", "/mogilefs/big.bin")
    response = connection.getresponse()
    assert response.status == 200 and int(response.headers["Content-Length"]) == SIZE
    digest, received = hashlib.md5(), 0
    while chunk := response.read(MIB):
        digest.update(chunk)
        received += len(chunk)
    growth_mib = (memory_kib(worker, "VmHWM") - before) / 1024

    assert received == SIZE and digest.hexdigest() == pattern_md5(SIZE)
    assert growth_mib < 32, f"worker memory grew by {growth_mib:.1f} MiB"
    connection.request("GET", "/")
    assert connection.getresponse().read() == b"hello from the app\n"
