"""Serve mode: a 256 MiB file under gunicorn (4) and uvicorn (8c), 100 KiB files under concurrency (7b–c)."""

from __future__ import annotations

import dataclasses
import http.client
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from . import servers
from .apps import answer_headers, constant_env
from .cluster import MEDIUM_KEY, MEDIUM_PATH, MEDIUM_SIZE, SMALL_PATH, Cluster
from .loads import CONCURRENCY, CONCURRENT_REQUESTS, CONCURRENT_SECONDS, WARM_SECONDS, concurrency, throughput
from .measure import Deadline, Spread, WrkResult, interleaved, ratios, wrk
from .report import Figure, Target

BIG_KEY = "big.bin"
BIG_SIZE = 256 * 1024 * 1024
MIB = 1024 * 1024
SERVE_OPTIONS = {"reproxy": None}
#: Serve mode keeping small files in memory (64 MiB per worker).
BODY_CACHE_OPTIONS = {"reproxy": None, "body_cache_bytes": 64 * MIB}
#: The issue's goals: serve mode at 0.85 of a direct GET, p99 at most twice the in-memory app's.
BIG_RATIO = 0.85
P99_RATIO = 2.0


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


def best(speed: Callable[[], float], runs: int = 3) -> Callable[[], float]:
    """The fastest of ``runs`` downloads, as timeit keeps the fastest run: the one the rest of the
    machine disturbed least."""
    return lambda: max(speed() for _ in range(runs))


def memory_mib(pid: int, field: str) -> float:
    """A memory figure of a process (``VmRSS``, ``VmHWM``...), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def serve(cluster: Cluster, repeat: int) -> list[Figure]:
    """4a–b and 8c: the 256 MiB downloads through gunicorn, uvicorn and a raw relay take turns
    with a GET straight from the storage node, each the fastest of three."""
    cluster.store(BIG_KEY, BIG_SIZE)
    direct_url = cluster.replica(BIG_KEY)
    workdir = cluster.workdir
    serve_env = cluster.middleware_env(**SERVE_OPTIONS)
    with servers.gunicorn(workdir, "serve", serve_env) as server, \
            servers.uvicorn(workdir, "serve", serve_env) as asgi_server, \
            servers.relay(workdir, direct_url) as relay_port:
        for warmed in (server, asgi_server):
            wrk(warmed.url(SMALL_PATH), workdir, connections=servers.WORKERS * 2, seconds=WARM_SECONDS)
        memory: dict[str, list[tuple[float, float]]] = {"gunicorn": [], "uvicorn": []}
        cpu: dict[str, list[float]] = {"gunicorn": [], "uvicorn": []}
        speeds = interleaved(repeat, {
            "direct": best(lambda: download(direct_url, BIG_SIZE)),
            "relay": best(lambda: download(f"http://{servers.HOST}:{relay_port}/", BIG_SIZE)),
            "gunicorn": best(lambda: served(server, memory["gunicorn"], cpu["gunicorn"])),
            "uvicorn": best(lambda: served(asgi_server, memory["uvicorn"], cpu["uvicorn"]))})
    ceiling = Spread.of(ratios(speeds["relay"], speeds["direct"]))
    relayed = (f"a raw relay of the node's response (bench.relay: no HTTP, 1 MiB reads) reaches "
               f"{ceiling.median:.3g} [{ceiling.low:.3g}–{ceiling.high:.3g}]")
    # The median over every download, the three of each figure.
    work = {name: f"{Spread.of([seconds * 1000 for seconds in spent]).median:.0f} ms" for name, spent in cpu.items()}
    wsgi = throughput("4a. serve 256 MiB", "GET from the node", speeds, "gunicorn", "direct", BIG_RATIO,
                      unit="MiB/s", note=f"{relayed}; the worker's CPU per download {work['gunicorn']}")
    # The ASGI goal: at least 0.8, and at least what gunicorn does in the same run.
    asgi_limit = round(max(0.8, wsgi.ratio.median), 3)
    versus = Spread.of(ratios(speeds["uvicorn"], speeds["gunicorn"]))
    asgi_growth = Spread.of([high - low for low, high in memory["uvicorn"]])
    asgi = throughput("8c. serve 256 MiB under uvicorn", "GET from the node", speeds, "uvicorn", "direct",
                      asgi_limit, unit="MiB/s",
                      note=f"limit: the higher of 0.8 and 4a's median ratio; {relayed}; uvicorn/gunicorn per repetition "
                           f"{versus.median:.3g} [{versus.low:.3g}–{versus.high:.3g}]; uvicorn's peak RSS growth "
                           f"{asgi_growth.high:.0f} MiB at most (one worker), its CPU per download "
                           f"{work['uvicorn']}")
    return [wsgi, memory_figure("4b. serve 256 MiB, worker memory", memory["gunicorn"], 32), asgi]


def small_files(cluster: Cluster, repeat: int) -> list[Figure]:
    """7b–c: 32 clients on a 100 KiB file in serve mode, with the body cache and streamed from the
    node each time, against an app answering the same body from memory; the node alone, loaded
    the same way, in 7c's note."""
    workdir = cluster.workdir
    body_headers = answer_headers(cluster.middleware(**SERVE_OPTIONS), MEDIUM_PATH)
    with servers.gunicorn(workdir, "serve-small", cluster.middleware_env(**SERVE_OPTIONS)) as streaming, \
            servers.gunicorn(workdir, "kept", cluster.middleware_env(**BODY_CACHE_OPTIONS)) as keeping, \
            servers.gunicorn(workdir, "body", constant_env(body_headers, MEDIUM_SIZE)) as body:
        for warmed in (streaming, keeping, body):
            wrk(warmed.url(MEDIUM_PATH), workdir, connections=servers.WORKERS * 2, seconds=WARM_SECONDS)
        goal = Target("ratio", "<=", P99_RATIO)
        kept = concurrency("7b. 32 clients, serve mode, body cache", "app with the same body",
                           keeping.url(MEDIUM_PATH), body.url(MEDIUM_PATH), workdir, repeat, goal,
                           {"value": keeping.cpu_seconds, "baseline": body.cpu_seconds})
        streamed = concurrency("7c. 32 clients, serve mode, streamed", "app with the same body",
                               streaming.url(MEDIUM_PATH), body.url(MEDIUM_PATH), workdir, repeat, goal,
                               {"value": streaming.cpu_seconds, "baseline": body.cpu_seconds})
        loads: dict[str, list[WrkResult]] = {"node": [], "body": []}

        def load(which: str, url: str) -> Callable[[], float]:
            def once() -> float:
                loads[which].append(wrk(url, workdir, connections=CONCURRENCY, seconds=CONCURRENT_SECONDS,
                                        count=CONCURRENT_REQUESTS))
                return loads[which][-1].rate
            return once

        rates = interleaved(repeat, {"node": load("node", cluster.replica(MEDIUM_KEY)),
                                     "body": load("body", body.url(MEDIUM_PATH))})
    rate = Spread.of(ratios(rates["node"], rates["body"]))
    p99 = Spread.of(ratios([result.p99_ms for result in loads["node"]], [result.p99_ms for result in loads["body"]]))
    ceiling = (f"; the storage node alone, loaded the same way, answers {rate.median:.3g} [{rate.low:.3g}–"
               f"{rate.high:.3g}] of the app's requests/s, with {p99.median:.3g} [{p99.low:.3g}–{p99.high:.3g}] "
               f"times its p99")
    return [kept, dataclasses.replace(streamed, note=streamed.note + ceiling)]


def served(server: servers.Server, memory: list[tuple[float, float]], cpu: list[float]) -> float:
    """MiB/s of a download of the big file through ``server``; appends to ``memory`` the RSS
    before and the peak during of the worker that grew most (the one that served), and to ``cpu``
    the seconds of CPU its workers spent."""
    workers = server.workers()
    before = {}
    for pid in workers:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the RSS
        before[pid] = memory_mib(pid, "VmRSS")
    spent = server.cpu_seconds()
    speed = download(server.url("/mogilefs/" + BIG_KEY), BIG_SIZE)
    cpu.append(server.cpu_seconds() - spent)
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
