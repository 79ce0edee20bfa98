"""Figures measured in this process: the hot paths (1, 8a), a cache miss (3) and an upload (6)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import http.client
import io
import os
import socket
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

from mogile_middleware import MogileFSMiddleware
from mogile_middleware.asgi import ASGIApp, Message
from mogile_middleware.protocol import encode_request
from mogile_middleware.upload import READ_SIZE, Uploader

from .apps import (WSGIApp, answer_headers, asgi_answer_headers, constant_app, constant_asgi_app, get_receive,
                   pattern, proxied_environ, proxied_scope)
from .cluster import CLASS, DOMAIN, SMALL_PATH, Cluster
from .measure import Deadline, Spread, interleaved, ratios, rotated
from .report import Figure, Target
from .servers import HOST

#: Calls per timing batch, and batches per repetition of which the fastest counts (timeit's rule:
#: it is the one the rest of the machine disturbed least).
HOT_CALLS = 20_000
HOT_BATCHES = 3
#: Fresh keys per repetition for the middleware, and as many for the raw tracker requests.
MISS_KEYS = 100
UPLOAD_SIZE = 64 * 1024 * 1024
MIB = 1024 * 1024


def _ignore(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    """A ``start_response`` that costs as little as possible."""


def hot_path(cluster: Cluster, repeat: int, name: str, options: dict[str, Any]) -> Figure:
    """1. µs per reproxy answer from a warm path cache, against an app returning the same headers:
    timeit's loop with gc on and the environ copied per call, as a server makes one per request."""
    wrapped = cluster.middleware(**options)
    bare = constant_app(answer_headers(wrapped, SMALL_PATH))  # which also warms the path cache
    environ = proxied_environ(SMALL_PATH)

    def calls(app: WSGIApp) -> Callable[[int], float]:
        return timeit.Timer("app(environ.copy(), start_response)", setup="gc.enable()",
                            globals={"app": app, "environ": environ, "start_response": _ignore, "gc": gc}).timeit

    return _hot_path_figure(name, repeat, calls(bare), calls(wrapped), Target("overhead", "<=", 2, " µs"))


def asgi_hot_path(cluster: Cluster, repeat: int, name: str, options: dict[str, Any]) -> Figure:
    """8a. The ASGI hot path: awaited in an event loop with gc on, a scope copied per call (a server
    makes a new one per request), a ``send`` doing nothing; against an app sending the same headers."""
    loop = asyncio.new_event_loop()
    wrapped = cluster.asgi_middleware(**options)
    try:
        # Which also warms the path cache, with the tracker connection in this loop.
        bare = constant_asgi_app(loop.run_until_complete(asgi_answer_headers(wrapped, SMALL_PATH)))
        scope = proxied_scope(SMALL_PATH)
        receive = get_receive()  # a reproxy answer never reads the request

        async def awaited(app: ASGIApp, count: int) -> float:
            start = time.perf_counter()
            for _ in range(count):
                await app(dict(scope), receive, _drop)
            return time.perf_counter() - start

        def calls(app: ASGIApp) -> Callable[[int], float]:
            return lambda count: loop.run_until_complete(awaited(app, count))

        return _hot_path_figure(name, repeat, calls(bare), calls(wrapped),
                                Target("overhead", "<", 5, " µs", stretch=3))
    finally:
        loop.run_until_complete(wrapped.client.aclose())
        loop.close()


async def _drop(message: Message) -> None:
    """A ``send`` that costs as little as possible."""


def _hot_path_figure(name: str, repeat: int, bare: Callable[[int], float], wrapped: Callable[[int], float],
                     target: Target) -> Figure:
    """The hot path row from two timers of ``count`` calls (seconds): µs per call of each, and the overhead."""
    deadline = Deadline(120, "the hot path loop")

    def per_call(calls: Callable[[int], float]) -> Callable[[], float]:
        def run() -> float:
            deadline.check()
            return min(calls(HOT_CALLS) for _ in range(HOT_BATCHES)) / HOT_CALLS * 1e6
        return run

    samples = interleaved(repeat, {"bare": per_call(bare), "wrapped": per_call(wrapped)})
    overhead = [value - base for value, base in zip(samples["wrapped"], samples["bare"])]
    return Figure(name, "µs/request", "bare app, same headers", Spread.of(samples["bare"]),
                  Spread.of(samples["wrapped"]), Spread.of(ratios(samples["wrapped"], samples["bare"])),
                  target, Spread.of(overhead))


class TrackerLine:
    """A kept-open connection to the tracker that times request lines, with nothing on top."""

    def __init__(self, address: str) -> None:
        host, port = address.split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the middleware's client does
        self.replies = self.sock.makefile("rb")

    def seconds(self, line: bytes) -> float:
        start = time.perf_counter()
        self.sock.sendall(line)
        self.replies.readline()
        return time.perf_counter() - start

    def close(self) -> None:
        self.replies.close()
        self.sock.close()


def _miss_times(wrapped: MogileFSMiddleware, raw: TrackerLine, keys: list[list[str]]) -> dict[str, list[float]]:
    """Seconds per request: the middleware for each key of ``keys[0]``, its client's ``get_paths``
    for each of ``keys[1]``, a raw ``get_paths`` for each of ``keys[2]``, and :func:`_python_work`
    right after a raw ``noop``, taking turns, since a connection used just before answers faster."""
    mine, clients, theirs = keys
    environs = [proxied_environ("/mogilefs/" + key) for key in mine]
    lines = [encode_request("get_paths", {"domain": DOMAIN, "key": key, "noverify": 1, "pathcount": 2})
             for key in theirs]
    noop = encode_request("noop", {})
    steps: dict[str, Callable[[int], float]] = {
        "wrapped": lambda n: _timed(lambda environ: wrapped(environ, _ignore), environs[n]),
        "client": lambda n: _timed(wrapped.client.get_paths, clients[n]),
        "raw": lambda n: raw.seconds(lines[n]), "after reply": lambda n: _after_reply(raw, noop, n)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for n in range(len(mine)):
        for name in rotated(list(steps), n):
            times[name].append(steps[name](n))
    return times


def _after_reply(raw: TrackerLine, line: bytes, tag: int) -> float:
    """Seconds :func:`_python_work` takes right after the reply to ``line``, as a client's work does."""
    raw.seconds(line)
    return _timed(_python_work, tag)


def _python_work(tag: int) -> list[str]:
    """Plain Python (dict, str and tuple work in ~60 steps), to time alone and right after a reply."""
    table = {str(number): (number, tag) for number in range(60)}
    return sorted(table)


def _timed(call: Callable[[Any], object], argument: Any) -> float:
    """Seconds that ``call(argument)`` takes."""
    start = time.perf_counter()
    call(argument)
    return time.perf_counter() - start


def cache_miss(cluster: Cluster, repeat: int) -> Figure:
    """3. A request for a key never asked for, against a raw ``get_paths`` on a kept-open socket.
    The note gives the middleware's client alone, asking for other new keys in the same turns, and
    what plain Python costs right after a tracker reply against back to back (timeit)."""
    keys = [f"miss/{n}" for n in range(3 * repeat * MISS_KEYS)]
    deadline = Deadline(120, "storing the keys for the cache miss")
    for key in keys:
        deadline.check()
        cluster.client.store_file(key, io.BytesIO(b"x"), cls=CLASS)
    # Without trusted_proxies a miss costs one tracker round trip (no HEAD for the length).
    wrapped = cluster.middleware(reproxy="perlbal")
    wrapped.client.pool.request("noop")  # its tracker connection is open, as the raw one is
    raw = TrackerLine(cluster.tracker)
    samples: dict[str, list[float]] = {"wrapped": [], "client": [], "raw": [], "after reply": []}
    deadline = Deadline(120, "the cache miss loop")
    try:
        for rep in range(repeat):
            deadline.check()
            turn = keys[3 * rep * MISS_KEYS:]
            times = _miss_times(wrapped, raw, [turn[i * MISS_KEYS:][:MISS_KEYS] for i in range(3)])
            for name, values in times.items():
                samples[name].append(statistics.median(values) * 1e6)
    finally:
        raw.close()
    client_times, after_reply = Spread.of(samples["client"]), Spread.of(samples["after reply"])
    alone = min(timeit.repeat(lambda: _python_work(0), number=1000, repeat=5)) / 1000 * 1e6
    return Figure("3. cache miss, in process", "µs/request", "raw get_paths", Spread.of(samples["raw"]),
                  Spread.of(samples["wrapped"]), Spread.of(ratios(samples["wrapped"], samples["raw"])),
                  Target("ratio", "<=", 1.1),
                  note=f"Client.get_paths alone: {client_times.median:.0f} µs [{client_times.low:.0f}–"
                       f"{client_times.high:.0f}]; the same Python that takes {alone:.0f} µs back to back takes "
                       f"{after_reply.median:.0f} µs [{after_reply.low:.0f}–{after_reply.high:.0f}] right after a "
                       "tracker reply")


def upload(cluster: Cluster, repeat: int) -> list[Figure]:
    """6a. ``store_file`` of 64 MiB with its MD5 checksum against the slower of a raw HTTP PUT of
    the same bytes to the storage node and MD5 alone over them; 6b. with ``checksums="kept"`` on a
    class that keeps none (no MD5) against the raw PUT. 6a's note gives the CPU an upload takes,
    here and in the node, and the speed the machine's cores allow it at most."""
    data = pattern(UPLOAD_SIZE)
    numbers = iter(range(4 * repeat))
    deadline = Deadline(300, "the upload loop")
    skipping = Uploader(cluster.client, checksums="kept")

    cpu: dict[str, list[float]] = {"here": [], "node": []}

    def stored(store: Callable[[str], object], count_cpu: bool = False) -> Callable[[], float]:
        def once() -> float:
            deadline.check()
            key = f"upload/{next(numbers)}"
            here, node, start = time.process_time(), cluster.node.cpu_seconds(), time.perf_counter()
            store(key)
            elapsed = time.perf_counter() - start
            if count_cpu:  # this process's threads (MD5 and sending) and the node receiving
                cpu["here"].append(time.process_time() - here)
                cpu["node"].append(cluster.node.cpu_seconds() - node)
            cluster.client.delete(key)  # the node's memory (tmpfs) holds one upload at a time
            return UPLOAD_SIZE / MIB / elapsed
        return once

    def raw() -> float:
        deadline.check()
        path = f"/dev1/raw/{next(numbers)}.fid"
        connection = http.client.HTTPConnection(HOST, cluster.node.port, timeout=60)
        start = time.perf_counter()
        connection.request("PUT", path, body=data)
        response = connection.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"PUT {path} answered {response.status}")
        connection.request("DELETE", path)
        connection.getresponse().read()
        connection.close()
        return UPLOAD_SIZE / MIB / elapsed

    def md5() -> float:
        view = memoryview(data)
        start = time.perf_counter()
        digest = hashlib.md5()
        for offset in range(0, UPLOAD_SIZE, READ_SIZE):  # the pieces store_file reads
            digest.update(view[offset:offset + READ_SIZE])
        return UPLOAD_SIZE / MIB / (time.perf_counter() - start)

    speeds = interleaved(repeat, {
        "raw": raw, "md5": md5,
        "stored": stored(lambda key: cluster.client.store_file(key, io.BytesIO(data), cls=CLASS), count_cpu=True),
        "skipped": stored(lambda key: skipping.upload(key, io.BytesIO(data), cls=CLASS))})
    speeds["slower"] = [min(put, digest) for put, digest in zip(speeds["raw"], speeds["md5"])]
    md5_alone = Spread.of(speeds["md5"])
    here, node = (statistics.median(seconds) for seconds in (cpu["here"], cpu["node"]))
    cores = os.cpu_count() or 1
    most = UPLOAD_SIZE / MIB / ((here + node) / cores)  # every core busy for the whole upload
    return [
        Figure("6a. upload 64 MiB with MD5", "MiB/s", "slower of raw PUT, MD5", Spread.of(speeds["slower"]),
               Spread.of(speeds["stored"]), Spread.of(ratios(speeds["stored"], speeds["slower"])),
               Target("ratio", ">=", 0.9),
               note=f"MD5 alone {md5_alone.median:,.0f} MiB/s [{md5_alone.low:,.0f}–{md5_alone.high:,.0f}]; "
                    f"an upload takes {here * 1000:.0f} ms of CPU here (MD5 and sending) and {node * 1000:.0f} ms "
                    f"in the node: {cores} cores allow at most {most:,.0f} MiB/s, a ratio of "
                    f"{most / Spread.of(speeds['slower']).median:.2f}"),
        Figure("6b. upload 64 MiB, no checksum", "MiB/s", "raw PUT to the node", Spread.of(speeds["raw"]),
               Spread.of(speeds["skipped"]), Spread.of(ratios(speeds["skipped"], speeds["raw"])),
               Target("ratio", ">=", 0.9), note='Uploader(checksums="kept") on a class that keeps none'),
    ]
