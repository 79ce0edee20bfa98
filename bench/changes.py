"""``python -m bench.changes``: what clients of a real front proxy see while another process
overwrites, then deletes, a key.

Why: the middleware caches a key's replica URLs (``path_cache_seconds``). When another process
overwrites or deletes the key, MogileFS removes the old fid's files a little later, and the
cached URLs then point at nothing. What clients get until the cache expires depends on the
front proxy: nginx with the shipped ``examples/nginx.conf`` asks the application again with
``X-Reproxy-Failed`` (the middleware then looks the key up anew), while Perlbal answers a
reproxy whose every URL failed with a 503 of its own. This measures both, over the development
MogileFS in its real-tracker-like mode (old files vanish :data:`DELAY` seconds after a change).

For each front: the middleware (reproxy mode, ``trusted_proxies``, a :data:`PATH_CACHE_SECONDS`
path cache) runs under gunicorn (2 sync workers) behind the proxy; a separate client (another
process's, sharing no cache) stores ``k``, concurrent reads through the proxy warm both workers'
caches, then the writer overwrites the key and it is polled every :data:`POLL_INTERVAL` seconds
for :data:`POLL_SECONDS`; then the writer deletes it and it is polled again. The tracker's
``get_paths`` calls are logged per connection (one per worker), so that the table shows when
each worker's cached path expires. Everything listens on 127.0.0.1. The table goes to stdout,
the samples and summaries to ``bench/results/changes.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS, TrackerServer

from . import apps, servers

RESULTS = Path(__file__).resolve().parent / "results" / "changes.json"
NGINX_CONF = servers.ROOT / "examples" / "nginx.conf"
HOST = servers.HOST
DOMAIN = "changes"
CLASS = "one"
KEY = "k"
PATH = f"/mogilefs/{KEY}"
OLD_BODY = b"the old version of k\n"
NEW_BODY = b"the NEW version of k, longer\n"
CHANGES = ("overwrite", "delete")
#: The fronts measured; "perlbal+fallback" gives the middleware ``perlbal_fallback_url``.
FRONTS = ("perlbal", "perlbal+fallback", "nginx")
#: Seconds after an overwrite or delete before the old fid's files are removed (as mogilefsd does).
DELAY = 0.5
PATH_CACHE_SECONDS = 10.0
POLL_INTERVAL = 0.05
POLL_SECONDS = 15.0
#: Reads through the proxy before the overwrite, :data:`WARM_CONCURRENCY` at a time: one after
#: the other, they may all be accepted by the same sync worker, leaving the other one's cache cold.
WARM_READS = 16
WARM_CONCURRENCY = 4
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class Sample:
    """One poll: seconds since the change, the status, and which body came back."""

    t: float
    status: int
    body: str  # "new", "old", or "other" (an error page, or the body of a 404)
    by: str  # who wrote an "other" body: "front" (an HTML page), "app" (the middleware's text), or ""


@dataclass(frozen=True)
class Phase:
    """The samples of one change through one front, and its timings (``t``: seconds since the
    writer's call returned)."""

    front: str
    change: str  # "overwrite" or "delete"
    write_seconds: float  # how long the writer's call took
    cache_expiry: list[float]  # when each worker's path, cached before the change, expires (t)
    lookups: list[float]  # when the workers asked the tracker for the key's paths while polled (t)
    old_gone: float | None  # the first poll at which the old replica URL answered 404 (t)
    samples: list[Sample]


# -- servers ------------------------------------------------------------------------------------


@contextmanager
def perlbal_front(workdir: Path, backend_port: int) -> Iterator[int]:
    """Perlbal reverse-proxying to the backend with ``X-REPROXY-*`` handling on; yields its port.

    The configuration of the integration tests' Perlbal front (``tests/integration/_proxies.py``).
    """
    port = servers.free_port()
    config = f"""CREATE POOL backends
  POOL backends ADD {HOST}:{backend_port}
CREATE SERVICE front
  SET role = reverse_proxy
  SET listen = {HOST}:{port}
  SET pool = backends
  SET enable_reproxy = true
  SET reproxy_cache_maxsize = 100
  SET persist_client = on
  SET persist_backend = off
  SET verify_backend = off
ENABLE front
"""
    path = workdir / "perlbal-front.conf"
    path.write_text(config)
    with servers.child(["perlbal", f"--config={path}"], [port], workdir / "perlbal-front.log"):
        yield port


@contextmanager
def nginx_front(workdir: Path, backend_port: int) -> Iterator[int]:
    """nginx on the shipped ``examples/nginx.conf`` with only its two ports changed; yields its port."""
    port = servers.free_port()
    config = NGINX_CONF.read_text()
    for shipped, ours in (("listen 127.0.0.1:8080;", f"listen {HOST}:{port};"),
                          ("server 127.0.0.1:8000;", f"server {HOST}:{backend_port};")):
        if config.count(shipped) != 1:
            raise RuntimeError(f"{NGINX_CONF} should hold {shipped!r} once")
        config = config.replace(shipped, ours)
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True)  # the config's temp paths are relative to the prefix
    (prefix / "nginx.conf").write_text(config)
    # -e: the log goes to stderr from the start, before the config's error_log is read.
    argv = ["nginx", "-p", f"{prefix}/", "-c", "nginx.conf", "-e", "stderr"]
    with servers.child(argv, [port], workdir / "nginx.log"):
        yield port


FRONT_RUNNERS: dict[str, Callable[[Path, int], AbstractContextManager[int]]] = {
    "perlbal": perlbal_front, "nginx": nginx_front}


@contextmanager
def middleware_behind(front: str, workdir: Path, tracker: str) -> Iterator[int]:
    """The middleware in ``front``'s reproxy mode under gunicorn, ``front`` before it; yields the
    front's port."""
    proxy, _, fallback = front.partition("+")
    app_port = servers.free_port()
    options: dict[str, Any] = {"reproxy": proxy, "trusted_proxies": [HOST], "path_cache_seconds": PATH_CACHE_SECONDS}
    if fallback:
        options["perlbal_fallback_url"] = f"http://{HOST}:{app_port}"
    with servers.gunicorn(workdir, proxy, apps.middleware_env(DOMAIN, tracker, options), app_port) as app, \
            FRONT_RUNNERS[proxy](workdir, app.port) as port:
        yield port


class LookupLog:
    """When the workers ask the development tracker for the key's paths, and on which connection.

    Each worker keeps its own tracker connection (served by a thread of its own), so the
    connection stands for the worker: its last lookup before a change is when its path was cached.
    """

    def __init__(self, tracker: TrackerServer) -> None:
        self.lookups: list[tuple[float, str]] = []
        self.writer_busy = False  # set while the writer's own lookups run
        answer = tracker.answer

        def logged(line: bytes) -> bytes:
            if not self.writer_busy and _asks_paths_of_key(line):
                self.lookups.append((time.monotonic(), threading.current_thread().name))
            return answer(line)

        tracker.answer = logged  # type: ignore[method-assign]

    def clear(self) -> None:
        """Forget the lookups so far (those of another gunicorn's workers)."""
        self.lookups.clear()

    def writer_paths(self, writer: Client) -> list[str]:
        """The key's replica URLs, asked by the writer (not logged)."""
        self.writer_busy = True
        try:
            return writer.get_paths(KEY)
        finally:
            self.writer_busy = False

    def expiries(self, since: float) -> list[float]:
        """When each worker's cached path expires, from its last lookup before ``since`` (t, sorted)."""
        last: dict[str, float] = {}
        for moment, connection in self.lookups:
            if moment < since:
                last[connection] = moment
        return sorted(round(moment + PATH_CACHE_SECONDS - since, 3) for moment in last.values())

    def between(self, since: float, until: float) -> list[float]:
        """The lookups from ``since`` to ``until`` (t)."""
        return [round(moment - since, 3) for moment, _ in self.lookups if since <= moment <= until]


def _asks_paths_of_key(line: bytes) -> bool:
    command, _, arguments = line.partition(b" ")
    return command == b"get_paths" and parse_qs(arguments.decode("latin-1")).get("key") == [KEY]


# -- measuring ----------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, bytes, str]:
    """One GET on a new connection: status, body and Content-Type (status 0 if the connection failed)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    except OSError:
        return 0, b"", ""
    finally:
        conn.close()


def version(body: bytes) -> str:
    """Which body this is: the key's ``new`` or ``old`` content, or ``other``."""
    return "new" if body == NEW_BODY else "old" if body == OLD_BODY else "other"


def author(body: bytes, content_type: str) -> str:
    """Who wrote an answer that is not the file: the front's error pages are HTML, the middleware's text."""
    if version(body) != "other":
        return ""
    return "front" if content_type.startswith("text/html") else "app" if content_type.startswith("text/plain") else "?"


def url_gone(url: str) -> bool:
    """True once the storage node answers 404 for ``url``."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=REQUEST_TIMEOUT)
    try:
        conn.request("HEAD", "/" + path)
        return conn.getresponse().status == 404
    finally:
        conn.close()


def poll(port: int, since: float, old_urls: list[str]) -> tuple[list[Sample], float | None]:
    """Read the key every ``POLL_INTERVAL`` s (ticks skipped while a request is slow) for
    ``POLL_SECONDS``; also note the first tick at which the old replica URLs are all gone."""
    samples: list[Sample] = []
    old_gone: float | None = None
    tick = 0
    while (start := since + tick * POLL_INTERVAL) < since + POLL_SECONDS:
        time.sleep(max(0.0, start - time.monotonic()))
        if old_gone is None and all(url_gone(url) for url in old_urls):
            old_gone = round(start - since, 3)
        status, body, content_type = get(port, PATH)
        samples.append(Sample(round(start - since, 3), status, version(body), author(body, content_type)))
        tick = max(tick + 1, int((time.monotonic() - since) / POLL_INTERVAL) + 1)
    return samples, old_gone


def change(port: int, writer: Client, log: LookupLog, front: str, name: str) -> Phase:
    """Overwrite or delete the key with ``writer``, then poll it through the front."""
    old_urls = log.writer_paths(writer)
    started = time.monotonic()
    if name == "overwrite":
        writer.store_content(KEY, NEW_BODY, cls=CLASS)
    else:
        writer.delete(KEY)
    since = time.monotonic()
    samples, old_gone = poll(port, since, old_urls)
    return Phase(front, name, round(since - started, 3), log.expiries(since), log.between(since, time.monotonic()),
                 old_gone, samples)


def run_front(front: str, mogile: DevMogileFS, log: LookupLog, workdir: Path) -> list[Phase]:
    """Both changes of the key through ``front``, after reads that warm the workers' caches."""
    writer = Client(DOMAIN, mogile.trackers)  # another process's client: it shares no cache
    log.clear()
    try:
        writer.store_content(KEY, OLD_BODY, cls=CLASS)
        with middleware_behind(front, workdir, mogile.trackers[0]) as port:
            with ThreadPoolExecutor(WARM_CONCURRENCY) as pool:
                reads = list(pool.map(lambda _: get(port, PATH)[:2], range(WARM_READS)))
            if any((status, version(body)) != (200, "old") for status, body in reads):
                raise RuntimeError(f"{front}: warming reads failed: {reads}")
            return [change(port, writer, log, front, name) for name in CHANGES]
    finally:
        writer.close()


# -- summarising --------------------------------------------------------------------------------


def goal(change_name: str, sample: Sample) -> bool:
    """True when the client sees the change: the new body, or a 404 after a delete."""
    if change_name == "overwrite":
        return sample.status == 200 and sample.body == "new"
    return sample.status == 404


def is_stale(change_name: str, sample: Sample) -> bool:
    """True when the client still gets the body from before the change."""
    return sample.status == 200 and sample.body == ("old" if change_name == "overwrite" else "new")


def is_error(change_name: str, sample: Sample) -> bool:
    """Neither the change nor the body before it: what a client would take for a failure."""
    return not goal(change_name, sample) and not is_stale(change_name, sample)


def summary(phase: Phase) -> dict[str, Any]:
    """When the body from before, errors and the change were seen, from the samples."""
    samples = phase.samples
    errors = [s for s in samples if is_error(phase.change, s)]
    stale = [s for s in samples if is_stale(phase.change, s)]
    reached = [s for s in samples if goal(phase.change, s)]
    for_good = next((s.t for i, s in enumerate(samples) if all(goal(phase.change, r) for r in samples[i:])), None)
    return {
        "polls": len(samples),
        "old_files_gone": phase.old_gone,
        "path_cache_expiry": phase.cache_expiry,
        "tracker_lookups": phase.lookups,
        "body_before": {"count": len(stale), "last": stale[-1].t if stale else None},
        "errors": {"count": len(errors), "statuses": dict(Counter(f"{s.status} {s.by}".rstrip() for s in errors)),
                   "first": errors[0].t if errors else None, "last": errors[-1].t if errors else None},
        "change_first": reached[0].t if reached else None,
        "change_for_good": for_good,
    }


def seconds(value: float | None) -> str:
    """A time for the table (``-`` when it never happened)."""
    return "-" if value is None else f"{value:.2f}"


def times(values: list[float], shown: int = 4) -> str:
    """Several times for the table: the first ``shown`` of them."""
    more = f" (+{len(values) - shown})" if len(values) > shown else ""
    return (", ".join(f"{value:.2f}" for value in values[:shown]) or "-") + more


def table(phases: list[Phase]) -> str:
    """One row per front and change."""
    header = ("front", "change", "write", "old gone", "cache expiry", "lookups", "before (n, last)",
              "errors (status by: n)", "error window", "change first", "for good", "polls")
    rows = [header]
    for phase in phases:
        s = summary(phase)
        errors, before = s["errors"], s["body_before"]
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(errors["statuses"].items())) or "none"
        window = f"{seconds(errors['first'])} .. {seconds(errors['last'])}" if errors["count"] else "-"
        rows.append((phase.front, phase.change, seconds(phase.write_seconds), seconds(phase.old_gone),
                     times(phase.cache_expiry), times(phase.lookups), f"{before['count']}, {seconds(before['last'])}",
                     statuses, window, seconds(s["change_first"]), seconds(s["change_for_good"]), str(s["polls"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


LEGEND = (f"Times in seconds since the writer's call returned. old gone: first poll at which the old replica "
          f"answers 404 (replication_delay {DELAY} s). cache expiry: when each worker's path, cached "
          f"({PATH_CACHE_SECONDS:.0f} s) at its last tracker lookup before the change, expires. lookups: the "
          f"workers' get_paths of the key while polled. before: answers with the body from before the change. "
          f"Errors by 'front': the proxy's own HTML page; by 'app': the middleware's.")


def write_json(path: Path, phases: list[Phase], elapsed: float) -> None:
    """The settings, and every phase's samples and summary."""
    settings = {"replication_delay": DELAY, "path_cache_seconds": PATH_CACHE_SECONDS, "poll_interval": POLL_INTERVAL,
                "poll_seconds": POLL_SECONDS, "gunicorn_workers": servers.WORKERS, "worker_class": "sync",
                "warm_reads": WARM_READS, "warm_concurrency": WARM_CONCURRENCY, "class_copies": 1,
                "storage": "DevMogileFS, one storage node"}
    document = {"settings": settings, "seconds": round(elapsed, 1),
                "phases": [{**asdict(phase), "summary": summary(phase)} for phase in phases]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def main() -> int:
    """Measure both fronts over one development MogileFS, print the table, save the JSON."""
    description = "What clients of a real front proxy see while another process overwrites, then deletes, a key."
    argparse.ArgumentParser(prog="python -m bench.changes", description=description).parse_args()
    started = time.monotonic()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="mogile-changes-") as directory:
        root = Path(directory)
        with DevMogileFS(root / "mogile", storage_nodes=1, domains={DOMAIN: {CLASS: 1}},
                         replication_delay=DELAY) as mogile:
            if mogile.tracker is None:
                raise RuntimeError("the development tracker did not start")
            log = LookupLog(mogile.tracker)
            for front in FRONTS:
                print(f"{front}...", file=sys.stderr, flush=True)
                workdir = root / front
                workdir.mkdir()
                phases += run_front(front, mogile, log, workdir)
    elapsed = time.monotonic() - started
    print(table(phases))
    print(f"{LEGEND} {elapsed:.0f} s in all.")
    write_json(RESULTS, phases, elapsed)
    print(f"saved {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
