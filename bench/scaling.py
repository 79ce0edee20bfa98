"""10e–h. The tracker client under 64 threads, and serve mode under 1 to 128 clients.

10e–f: ``Client.get_paths`` from 64 threads at once against 64 raw kept-open sockets sending the
same request line: the rate, and how many connections the client's pool opened for it. 10g–h:
a 100 KiB file in serve mode with the body cache, under gunicorn (two sync workers) and under
uvicorn (two workers), against an app of the same server answering the same body; beyond a few
clients the requests queue, which is what the rows and the plot show.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from mogile_middleware import Client
from mogile_middleware.protocol import encode_request
from mogile_middleware.tracker import Dial, Step, TrackerPool

from . import servers
from .apps import answer_headers, constant_env
from .cluster import DOMAIN, MEDIUM_PATH, MEDIUM_SIZE, SMALL_KEY, Cluster
from .inprocess import TrackerLine
from .loads import WARM_SECONDS
from .measure import Deadline, Spread, WrkResult, interleaved, ratios, wrk
from .plot import Curve, concurrency_svg
from .report import Figure, Target
from .serving import BODY_CACHE_OPTIONS, SERVE_OPTIONS

THREADS = 64
THREAD_SECONDS = 2.0
#: get_paths per thread per run at most (the run ends on time long before).
THREAD_CALLS = 1_000_000
#: The issue's goal: the client's rate against raw sockets.
CLIENT_RATIO = 0.9
SERVE_CLIENTS = (1, 8, 32, 128)
#: Requests per wrk run: enough for a p99, few enough for 1 client to finish in seconds.
SERVE_REQUESTS = 1000
SERVE_LIMIT_SECONDS = 60.0
#: The issue's goal: serve mode's requests/s at least half the in-memory app's (held at every concurrency).
SERVE_RATIO = 0.5


class CountingPool(TrackerPool):
    """A :class:`TrackerPool` that counts the connections it opens (its ``Dial`` steps)."""

    def __init__(self, trackers: str) -> None:
        super().__init__(trackers)
        self.opened = 0
        self._count_lock = threading.Lock()

    def _carry_out(self, step: Step) -> object:
        if isinstance(step, Dial):
            with self._count_lock:
                self.opened += 1
        return super()._carry_out(step)


def threaded_rate(calls: list[Callable[[], object]], deadline: Deadline) -> float:
    """Calls per second of one thread per ``calls`` item, each calling it for ``THREAD_SECONDS``."""
    deadline.check()
    counts = [0] * len(calls)
    start = threading.Barrier(len(calls) + 1)
    end = [0.0]

    def run(index: int) -> None:
        call = calls[index]
        start.wait()
        for done in range(THREAD_CALLS):
            if time.monotonic() >= end[0]:
                counts[index] = done
                return
            call()
        counts[index] = THREAD_CALLS

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    end[0] = began + THREAD_SECONDS
    start.wait()
    for thread in threads:
        thread.join(THREAD_SECONDS + 30)
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError("a get_paths thread did not end")
    return sum(counts) / (time.monotonic() - began)


def threaded_client(cluster: Cluster, repeat: int) -> list[Figure]:
    """10e. get_paths/s of one client shared by ``THREADS`` threads against as many raw sockets;
    10f. the connections that client opened over the whole run, which its threads bound."""
    pool = CountingPool(cluster.tracker)
    client = Client(DOMAIN, pool=pool)
    line = encode_request("get_paths", {"domain": DOMAIN, "key": SMALL_KEY, "noverify": 1, "pathcount": 2})
    raw = [TrackerLine(cluster.tracker) for _ in range(THREADS)]
    deadline = Deadline(120, "the threaded tracker client")
    opened: list[float] = []

    def with_client() -> float:
        rate = threaded_rate([lambda: client.get_paths(SMALL_KEY)] * THREADS, deadline)
        opened.append(pool.opened)
        return rate

    try:
        rates = interleaved(repeat, {"raw": lambda: threaded_rate([lambda s=s: s.seconds(line) for s in raw], deadline),
                                     "client": with_client})
    finally:
        client.close()
        for socket_line in raw:
            socket_line.close()
    connections = Spread.of(opened)
    return [
        Figure(f"10e. tracker client, {THREADS} threads", "get_paths/s", f"{THREADS} raw sockets",
               Spread.of(rates["raw"]), Spread.of(rates["client"]), Spread.of(ratios(rates["client"], rates["raw"])),
               Target("ratio", ">=", CLIENT_RATIO), note=f"{THREAD_SECONDS:g} s per run, one key"),
        Figure(f"10f. tracker client, {THREADS} threads, connections", "connections", f"{THREADS} raw sockets",
               Spread.of([float(THREADS)]), connections, Spread.of([count / THREADS for count in opened]),
               Target("connections", "<=", THREADS, worst=True), connections,
               "opened since the client was made, counted after each repetition"),
    ]


#: The servers of 10g (gunicorn, sync workers) and 10h (uvicorn), each with ``servers.WORKERS`` workers.
SERVE_SERVERS: dict[str, tuple[str, Callable[..., AbstractContextManager[servers.Server]]]] = {
    "gunicorn": ("10g", servers.gunicorn),
    "uvicorn": ("10h", functools.partial(servers.uvicorn, workers=servers.WORKERS)),
}


def serve_clients(cluster: Cluster, repeat: int, plot: Path) -> list[Figure]:
    """10g–h. Serve mode's requests/s, with the body cache, under gunicorn and under uvicorn, with
    1, 8, 32 and 128 clients on a 100 KiB file, against an app of the same server answering the same
    body, held to ``SERVE_RATIO``; a run with an error is refused. Their curves go to ``plot`` (SVG)."""
    body_headers = answer_headers(cluster.middleware(**SERVE_OPTIONS), MEDIUM_PATH)
    workdir = cluster.workdir
    runs: dict[tuple[str, int, str], list[WrkResult]] = {}

    def run(url: str, key: tuple[str, int, str]) -> Callable[[], float]:
        def once() -> float:
            result = wrk(url, workdir, connections=key[1], seconds=SERVE_LIMIT_SECONDS, count=SERVE_REQUESTS)
            if result.errors:
                raise RuntimeError(f"{url}, {key[1]} clients: {result.errors} errors in {result.requests} requests")
            runs.setdefault(key, []).append(result)
            return result.rate
        return once

    figures = []
    curves: dict[str, Curve] = {}
    for kind, (number, start) in SERVE_SERVERS.items():
        with start(workdir, "serve-clients", cluster.middleware_env(**BODY_CACHE_OPTIONS)) as server, \
                start(workdir, "body-clients", constant_env(body_headers, MEDIUM_SIZE)) as body:
            for warmed in (server, body):
                wrk(warmed.url(MEDIUM_PATH), workdir, connections=servers.WORKERS * 2, seconds=WARM_SECONDS)
            for clients in SERVE_CLIENTS:
                rates = interleaved(repeat, {"serve": run(server.url(MEDIUM_PATH), (kind, clients, "serve")),
                                             "body": run(body.url(MEDIUM_PATH), (kind, clients, "body"))})
                p99 = {which: Spread.of([result.p99_ms for result in runs[kind, clients, which]])
                       for which in ("serve", "body")}
                for which, name in (("serve", f"{kind}, serve mode, body cache"), ("body", f"{kind}, in memory")):
                    curves.setdefault(name, []).append((clients, Spread.of(rates[which]).median, p99[which].median))
                figures.append(Figure(
                    f"{number}. serve mode, {kind}, {clients} clients", "requests/s", "app with the same body",
                    Spread.of(rates["body"]), Spread.of(rates["serve"]), Spread.of(ratios(rates["serve"], rates["body"])),
                    Target("ratio", ">=", SERVE_RATIO),
                    note=f"body cache; p99 {p99['serve'].median:.3g} ms [{p99['serve'].low:.3g}–{p99['serve'].high:.3g}]"
                         f" against {p99['body'].median:.3g} ms; {SERVE_REQUESTS} requests per run, "
                         f"{servers.WORKERS} workers"))
    concurrency_svg(plot, curves, f"A {MEDIUM_SIZE // 1024} KiB file: serve mode with the body cache against an app "
                                  f"answering it from memory ({servers.WORKERS} workers)")
    return figures
