"""Serve mode under gunicorn: a 256 MiB file (4) and small files under concurrency (7b)."""

from __future__ import annotations

import http.client
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import servers
from .apps import answer_headers, constant_env
from .cluster import SMALL_PATH, SMALL_SIZE, Cluster
from .loads import WARM_SECONDS, concurrency, throughput
from .measure import Deadline, Spread, interleaved, wrk
from .report import Figure, Target

BIG_KEY = "big.bin"
BIG_SIZE = 256 * 1024 * 1024
MIB = 1024 * 1024
SERVE_OPTIONS = {"reproxy": None}


def download(url: str, size: int) -> float:
    """MiB/s of one GET of ``url`` (``size`` bytes), read in 1 MiB pieces into one buffer."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    buffer = memoryview(bytearray(MIB))
    received = 0
    deadline = Deadline(120, f"GET {url}")
    start = time.perf_counter()
    connection.request("GET", parts.path)
    response = connection.getresponse()
    while count := response.readinto(buffer):
        received += count
        deadline.check()
    elapsed = time.perf_counter() - start
    connection.close()
    if response.status != 200 or received != size:
        raise RuntimeError(f"GET {url}: HTTP {response.status}, {received} of {size} bytes")
    return size / MIB / elapsed


def memory_mib(pid: int, field: str) -> float:
    """A memory figure of a process (``VmRSS``, ``VmHWM``...), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def serve(cluster: Cluster, repeat: int) -> list[Figure]:
    """4a–b and 7b: against a GET straight from the storage node, and an app answering the same body."""
    cluster.store(BIG_KEY, BIG_SIZE)
    direct_url = cluster.replica(BIG_KEY)
    body_headers = answer_headers(cluster.middleware(**SERVE_OPTIONS), SMALL_PATH)
    workdir = cluster.workdir
    with servers.gunicorn(workdir, "serve", cluster.middleware_env(**SERVE_OPTIONS)) as server, \
            servers.gunicorn(workdir, "body", constant_env(body_headers, SMALL_SIZE)) as body:
        wrk(server.url(SMALL_PATH), workdir, connections=servers.WORKERS * 2, seconds=WARM_SECONDS)
        memory: list[tuple[float, float]] = []  # (RSS before, peak during) of the worker that served

        def served() -> float:
            workers = server.workers()
            before = {}
            for pid in workers:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the RSS
                before[pid] = memory_mib(pid, "VmRSS")
            speed = download(server.url("/mogilefs/" + BIG_KEY), BIG_SIZE)
            memory.append(max(((before[pid], memory_mib(pid, "VmHWM")) for pid in workers),
                              key=lambda sizes: sizes[1] - sizes[0]))
            return speed

        speeds = interleaved(repeat, {"direct": lambda: download(direct_url, BIG_SIZE), "served": served})
        concurrent = concurrency("7b. 32 clients, serve mode", "app with the same body", server.url(SMALL_PATH),
                                 body.url(SMALL_PATH), workdir, repeat)
    before, peak = [sizes[0] for sizes in memory], [sizes[1] for sizes in memory]
    return [
        throughput("4a. serve 256 MiB", "GET from the node", speeds, "served", "direct", 0.8, unit="MiB/s"),
        Figure("4b. serve 256 MiB, worker memory", "MiB", "RSS before", Spread.of(before), Spread.of(peak),
               Spread.of([high / low for low, high in memory]), Target("growth", "<", 32, " MiB", worst=True),
               Spread.of([high - low for low, high in memory])),
        concurrent,
    ]
