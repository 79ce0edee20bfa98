"""Serve mode: a 256 MiB file under gunicorn (4) and uvicorn (8c), small files under concurrency (7b)."""

from __future__ import annotations

import http.client
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import servers
from .apps import answer_headers, constant_env
from .cluster import SMALL_PATH, SMALL_SIZE, Cluster
from .loads import WARM_SECONDS, concurrency, throughput
from .measure import Deadline, Spread, interleaved, ratios, wrk
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
    """4a–b, 7b and 8c: against a GET straight from the storage node, and an app answering the same
    body; the 256 MiB downloads through gunicorn, uvicorn and a raw relay take turns with the direct one."""
    cluster.store(BIG_KEY, BIG_SIZE)
    direct_url = cluster.replica(BIG_KEY)
    body_headers = answer_headers(cluster.middleware(**SERVE_OPTIONS), SMALL_PATH)
    workdir = cluster.workdir
    serve_env = cluster.middleware_env(**SERVE_OPTIONS)
    with servers.gunicorn(workdir, "serve", serve_env) as server, \
            servers.gunicorn(workdir, "body", constant_env(body_headers, SMALL_SIZE)) as body, \
            servers.uvicorn(workdir, "serve", serve_env) as asgi_server, \
            servers.relay(workdir, direct_url) as relay_port:
        for warmed in (server, asgi_server):
            wrk(warmed.url(SMALL_PATH), workdir, connections=servers.WORKERS * 2, seconds=WARM_SECONDS)
        memory: dict[str, list[tuple[float, float]]] = {"gunicorn": [], "uvicorn": []}
        speeds = interleaved(repeat, {"direct": lambda: download(direct_url, BIG_SIZE),
                                      "relay": lambda: download(f"http://{servers.HOST}:{relay_port}/", BIG_SIZE),
                                      "gunicorn": lambda: served(server, memory["gunicorn"]),
                                      "uvicorn": lambda: served(asgi_server, memory["uvicorn"])})
        concurrent = concurrency("7b. 32 clients, serve mode", "app with the same body", server.url(SMALL_PATH),
                                 body.url(SMALL_PATH), workdir, repeat)
    ceiling = Spread.of(ratios(speeds["relay"], speeds["direct"]))
    relayed = (f"a raw relay of the node's response (bench.relay: no HTTP, 1 MiB reads) reaches "
               f"{ceiling.median:.3g} [{ceiling.low:.3g}–{ceiling.high:.3g}]")
    wsgi = throughput("4a. serve 256 MiB", "GET from the node", speeds, "gunicorn", "direct", 0.8, unit="MiB/s",
                      note=relayed)
    # At least 0.8, and at least what gunicorn does in the same run.
    asgi_limit = round(max(0.8, wsgi.ratio.median), 3)
    versus = Spread.of(ratios(speeds["uvicorn"], speeds["gunicorn"]))
    asgi_growth = Spread.of([high - low for low, high in memory["uvicorn"]])
    asgi = throughput("8c. serve 256 MiB under uvicorn", "GET from the node", speeds, "uvicorn", "direct",
                      asgi_limit, unit="MiB/s",
                      note=f"limit: the higher of 0.8 and 4a's median ratio; {relayed}; uvicorn/gunicorn per repetition "
                           f"{versus.median:.3g} [{versus.low:.3g}–{versus.high:.3g}]; uvicorn's peak RSS growth "
                           f"{asgi_growth.high:.0f} MiB at most (one worker)")
    return [wsgi, memory_figure("4b. serve 256 MiB, worker memory", memory["gunicorn"], 32), concurrent, asgi]


def served(server: servers.Server, memory: list[tuple[float, float]]) -> float:
    """MiB/s of a download of the big file through ``server``; appends to ``memory`` the RSS
    before and the peak during of the worker that grew most (the one that served)."""
    workers = server.workers()
    before = {}
    for pid in workers:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the RSS
        before[pid] = memory_mib(pid, "VmRSS")
    speed = download(server.url("/mogilefs/" + BIG_KEY), BIG_SIZE)
    memory.append(max(((before[pid], memory_mib(pid, "VmHWM")) for pid in workers),
                      key=lambda sizes: sizes[1] - sizes[0]))
    return speed


def memory_figure(name: str, memory: list[tuple[float, float]], growth_mib: float, note: str = "") -> Figure:
    """A worker's peak RSS against its RSS before, held to a growth under ``growth_mib`` in every repetition."""
    before, peak = [low for low, _ in memory], [high for _, high in memory]
    return Figure(name, "MiB", "RSS before", Spread.of(before), Spread.of(peak),
                  Spread.of([high / low for low, high in memory]),
                  Target("growth", "<", growth_mib, " MiB", worst=True),
                  Spread.of([high - low for low, high in memory]), note)
