"""The middleware under a real gunicorn: a 256 MiB file streams with flat worker memory."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DOMAIN
from integration._wire_client import free_port
from wiretools import PatternFile, pattern_md5

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS

pytest.importorskip("gunicorn", reason="gunicorn is installed by the test command ('.[dev]')")

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SIZE = 256 * 1024 * 1024
MIB = 1024 * 1024


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def worker_pid(master: int) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("gunicorn started no worker")


@pytest.fixture
def gunicorn(devmogile: DevMogileFS):
    port = free_port()
    env = {**os.environ, "MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0],
           "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}",
         "--timeout", "60", "_gunicorn_app:make_app()"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        process.kill()
        raise AssertionError(f"gunicorn did not start: {process.stderr.read().decode()[-2000:]}")
    yield port, process.pid
    process.terminate()
    process.wait(15)


def test_a_256_mib_file_streams_with_flat_worker_memory(devmogile: DevMogileFS, gunicorn) -> None:
    port, master = gunicorn
    client = Client(DOMAIN, devmogile.trackers, storage_timeout=60)
    client.store_file("big.bin", PatternFile(SIZE), cls="thumb")
    client.store_content("small.txt", b"warm-up", cls="thumb")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/mogilefs/small.txt")
    assert connection.getresponse().read() == b"warm-up"
    worker = worker_pid(master)
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
