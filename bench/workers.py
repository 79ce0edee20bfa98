"""10c–d. 1, 2, 4 and 8 gunicorn workers on 1000 hot keys, with the path cache in each worker
or shared in memcached: tracker lookups per key per time to live, and requests/s.

Each worker's own cache asks the tracker once per key per time to live, so N workers ask about
N times; one shared in memcached asks about once, whatever N. The middleware answers with
``X-REPROXY-URL`` (no ``trusted_proxies``: a lookup is one ``get_paths``), so the tracker's
work, not the storage node's, is what grows. The bench tracker counts the commands it answers
(:func:`bench.tracker.command_counts`), read at the end of every time to live: those windows are
a run's samples. One run per row, whatever ``repeat``, to keep the figure under a minute and a half.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mogile_middleware import paste

from . import servers
from .apps import WSGIApp, hello
from .cluster import CLASS, DOMAIN, Cluster
from .measure import Deadline, Spread, WrkResult, ratios, wrk
from .report import Figure, Target
from .tracker import command_counts

WORKER_COUNTS = (1, 2, 4, 8)
KEYS = 1000
KEY_PREFIX = "hot/"
TTL_SECONDS = 2.0
#: Windows of one time to live per run: each a sample of lookups per key.
WINDOWS = 3
#: wrk's run: the windows and a second more (wrk takes whole seconds), so the last is loaded to its end.
LOAD_SECONDS = WINDOWS * TTL_SECONDS + 1
#: The issue's goal: "about one" lookup per key per time to live with memcached, whatever N, in
#: every window (more would be workers missing at once and each asking).
SHARED_LOOKUPS = 1.2
#: Requests/s with memcached against the in-process cache at the same N: a regression catch. One
#: worker loses the most (a memcached get per request, and no tracker lookups to save): 0.3-0.42
#: in this bench; with more workers memcached is about as fast or faster, as it saves lookups.
SHARED_RATE_RATIO = 0.25
#: What ``make_app`` reads: the PasteDeploy filter's options (ini strings), as JSON.
OPTIONS_VARIABLE = "BENCH_FILTER_OPTIONS"
#: wrk's requests going round the keys.
ROUND_ROBIN_LUA = f"""
local turn = 0
function request()
  turn = turn + 1
  return wrk.format(nil, "/mogilefs/{KEY_PREFIX}" .. (turn % {KEYS}))
end
"""


def make_app() -> WSGIApp:
    """The middleware over :func:`bench.apps.hello`, made by the PasteDeploy filter from the
    options in ``BENCH_FILTER_OPTIONS`` (``memcached_servers`` gives the shared cache)."""
    return paste.filter_factory({}, **json.loads(os.environ[OPTIONS_VARIABLE]))(hello)


@contextmanager
def memcached(workdir: Path) -> Iterator[str]:
    """A memcached of 64 MiB on 127.0.0.1 (TCP only), empty; yields its ``host:port``."""
    port = servers.free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root unless told whom to be
    argv = ["memcached", "-l", servers.HOST, "-p", str(port), "-U", "0", "-m", "64", *user]
    with servers.child(argv, [port], workdir / "memcached.log"):
        yield f"{servers.HOST}:{port}"


@contextmanager
def workers(cluster: Cluster, count: int, options: dict[str, str]) -> Iterator[servers.Server]:
    """:func:`make_app` under gunicorn with ``count`` sync workers."""
    env = {OPTIONS_VARIABLE: json.dumps({"domain": DOMAIN, "trackers": cluster.tracker, **options})}
    with servers.gunicorn(cluster.workdir, f"workers-{count}", env, workers=count,
                          app="bench.workers:make_app()") as server:
        yield server


def store_keys(cluster: Cluster) -> None:
    """Store the ``KEYS`` hot keys (one byte each)."""
    deadline = Deadline(120, "storing the hot keys")
    for number in range(KEYS):
        deadline.check()
        cluster.client.store_content(f"{KEY_PREFIX}{number}", b"x", cls=CLASS)


def lookups_per_window(cluster: Cluster, server: servers.Server, workdir: Path) -> tuple[list[float], WrkResult]:
    """Load ``server`` for ``WINDOWS`` times to live from cold; the ``get_paths`` the tracker
    answered per key in each, and what wrk saw."""
    seen = [command_counts(cluster.tracker)["get_paths"]]
    with ThreadPoolExecutor(1) as executor:
        began = time.monotonic()
        load = executor.submit(wrk, server.url("/"), workdir, connections=2 * len(server.workers()),
                               seconds=LOAD_SECONDS, lua=ROUND_ROBIN_LUA)
        for window in range(1, WINDOWS + 1):
            time.sleep(max(0.0, began + window * TTL_SECONDS - time.monotonic()))
            seen.append(command_counts(cluster.tracker)["get_paths"])
        result = load.result(timeout=60)
    if result.errors:
        raise RuntimeError(f"{server.url('/')}: {result.errors} errors in {result.requests} requests")
    return [(after - before) / KEYS for before, after in zip(seen, seen[1:])], result


def shared_cache(cluster: Cluster, repeat: int) -> list[Figure]:
    """10c. Lookups per key per time to live with memcached against the in-process cache, held to
    ``SHARED_LOOKUPS``; 10d. requests/s with memcached against in process, held to ``SHARED_RATE_RATIO``."""
    store_keys(cluster)
    workdir = cluster.workdir
    base: dict[str, Any] = {"reproxy": "perlbal", "path_cache_seconds": str(TTL_SECONDS)}
    figures = []
    for count in WORKER_COUNTS:
        lookups: dict[str, list[float]] = {}
        results: dict[str, WrkResult] = {}
        with workers(cluster, count, base) as server:
            lookups["own"], results["own"] = lookups_per_window(cluster, server, workdir)
        with memcached(workdir) as address, workers(cluster, count, {**base, "memcached_servers": address}) as server:
            lookups["shared"], results["shared"] = lookups_per_window(cluster, server, workdir)
        rates = {which: result.rate for which, result in results.items()}
        # A key is looked up again at its first request after the time to live: a worker that sees
        # it only every KEYS * count / rate seconds on average asks less than once per time to live.
        expected = count * TTL_SECONDS / (TTL_SECONDS + KEYS * count / rates["own"])
        shared = Spread.of(lookups["shared"])
        figures.append(Figure(
            f"10c. {count} workers, lookups per key per TTL", "get_paths/key/TTL", "each worker's own cache",
            Spread.of(lookups["own"]), shared, Spread.of(ratios(lookups["shared"], lookups["own"])),
            Target("memcached", "<=", SHARED_LOOKUPS, worst=True), shared,
            f"memcached; each worker's own cache: {expected:.2f} expected at {rates['own']:,.0f} requests/s "
            f"(at most {count}); {WINDOWS} windows of {TTL_SECONDS:g} s from cold"))
        figures.append(Figure(
            f"10d. {count} workers, requests/s", "requests/s", "each worker's own cache",
            Spread.of([rates["own"]]), Spread.of([rates["shared"]]), Spread.of([rates["shared"] / rates["own"]]),
            Target("ratio", ">=", SHARED_RATE_RATIO),
            note=f"memcached; {KEYS} keys in turn, {2 * count} connections, {LOAD_SECONDS:g} s per run"))
    return figures
