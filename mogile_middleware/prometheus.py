"""Prometheus metrics: a :class:`~mogile_middleware.metrics.Recorder` for ``prometheus_client``.

``record()`` starts counting (once per process, before gunicorn forks its workers or in each);
``registry()`` is what to expose: the default registry, or, when ``PROMETHEUS_MULTIPROC_DIR``
is set (gunicorn with several workers), one that sums every worker's files. ``MetricsEndpoint``
answers ``GET /metrics`` in front of any WSGI application, and is the PasteDeploy filter
``egg:mogile_middleware#metrics``. Needs the ``prometheus`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

try:
    from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                                   generate_latest, make_wsgi_app, multiprocess)
    from prometheus_client.metrics_core import Metric
except ModuleNotFoundError as error:  # the optional extra, named as the memcached options name theirs
    raise ModuleNotFoundError(f"mogile_middleware.prometheus needs prometheus_client: "
                              f"pip install 'mogile_middleware[prometheus]' ({error})", name=error.name) from error

from . import metrics
from .http import METHOD_NOT_ALLOWED
from .middleware import StartResponse, WSGIApp
from .throttle import ThrottledLog

#: Tracker round trips are milliseconds; a timeout is seconds.
TRACKER_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = logging.getLogger("mogile_middleware")
T = TypeVar("T")
#: Events a metric file could not take (``PROMETHEUS_MULTIPROC_DIR`` a worker may not write, or
#: removed), logged once a minute at most: the request goes on.
_unrecorded = ThrottledLog(log, logging.WARNING, "metrics not recorded: %r", 60.0, "events")


def _never_raising(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` of an event, which the request path calls and which must not raise: a metric file
    it cannot write (prometheus_client opens one per process and metric, at its first use) drops
    the event, where the error failed the request."""
    @functools.wraps(method)
    def recorded(self: PrometheusRecorder, *args: Any) -> None:
        try:
            method(self, *args)
        except OSError as error:
            _unrecorded.event(error)
    return recorded


class PrometheusRecorder(metrics.Recorder):
    """Every event as a ``prometheus_client`` counter, histogram or gauge named ``<namespace>_...``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, namespace: str = "mogile_middleware") -> None:
        # Registered once all are made: an unlabelled metric opens its file as it is made in
        # multiprocess mode, and one that failed left the others registered, to be made again.
        made: list[Any] = []

        def counter(name: str, documentation: str, labels: Iterable[str] = ()) -> Counter:
            return metric(Counter(name, documentation, labels, namespace=namespace, registry=None))

        def metric(made_one: T) -> T:
            made.append(made_one)
            return made_one

        # Label lookups cost more than the increment: each combination's child is looked up once.
        self._requests = _Children(counter("requests", "Requests under the prefix, by how they were answered "
                                           "and status", ["mode", "status"]),
                                   lambda mode, status: (mode, status[:3]))
        self._bytes_served = counter("served_bytes", "Body bytes streamed from storage nodes in serve mode")
        self._tracker_calls = _Children(counter("tracker_calls", "Tracker commands, by tracker, command and "
                                                "outcome (ok, error: an ERR reply, failed: no usable reply)",
                                                ["tracker", "command", "outcome"]))
        self._tracker_seconds = _Children(metric(Histogram(
            "tracker_call_seconds", "Tracker command round trips", ["command"],
            namespace=namespace, registry=None, buckets=TRACKER_SECONDS_BUCKETS)))
        self._tracker_skips = _Children(counter(
            "dead_tracker_skips", "Requests that skipped a tracker marked dead, or being asked if back", ["tracker"]))
        self._cache_hits = counter("path_cache_hits", "Path cache answers with fresh paths")
        self._cache_misses = counter("path_cache_misses", "Path cache misses (the trackers are asked)")
        self._cache_stale = counter("path_cache_stale", "Stale paths served while no tracker answered")
        self._cache_invalidations = counter("path_cache_invalidations", "Keys dropped from the path cache")
        self._cache_entries = metric(Gauge("path_cache_entries", "Keys in the in-process path cache",
                                           namespace=namespace, registry=None, multiprocess_mode="livesum"))
        self._body_cache = _Children(counter("body_cache_lookups", "Body cache lookups, by result (hit, miss)",
                                             ["result"]), lambda hit: ("hit" if hit else "miss",))
        self._failovers = counter("replica_failovers", "Replicas that failed, so the next was asked")
        self._uploads = _Children(counter("uploads", "Uploads, by outcome (stored, failed, unknown)", ["outcome"]))
        self._uploaded_bytes = counter("uploaded_bytes", "Bytes sent by uploads")
        for each in made:
            registry.register(each)

    @_never_raising
    def request(self, mode: str, status: str) -> None:
        self._requests[mode, status].inc()

    @_never_raising
    def bytes_served(self, count: int) -> None:
        self._bytes_served.inc(count)

    @_never_raising
    def tracker_call(self, tracker: str, command: str, seconds: float, outcome: str) -> None:
        self._tracker_calls[tracker, command, outcome].inc()
        self._tracker_seconds[command,].observe(seconds)

    @_never_raising
    def tracker_skipped(self, tracker: str) -> None:
        self._tracker_skips[tracker,].inc()

    @_never_raising
    def cache_hit(self) -> None:
        self._cache_hits.inc()

    @_never_raising
    def cache_miss(self) -> None:
        self._cache_misses.inc()

    @_never_raising
    def cache_stale(self) -> None:
        self._cache_stale.inc()

    @_never_raising
    def cache_invalidated(self) -> None:
        self._cache_invalidations.inc()

    @_never_raising
    def cache_size(self, entries: int) -> None:
        self._cache_entries.set(entries)

    @_never_raising
    def body_cache(self, hit: bool) -> None:
        self._body_cache[hit,].inc()

    @_never_raising
    def replica_failover(self) -> None:
        self._failovers.inc()

    @_never_raising
    def upload(self, outcome: str, size: int) -> None:
        self._uploads[outcome,].inc()
        self._uploaded_bytes.inc(size)


class _Children(dict):  # type: ignore[type-arg]
    """A labelled metric's children by the values an event gives, each made on first use."""

    def __init__(self, metric: Any, labels: Callable[..., tuple[str, ...]] | None = None) -> None:
        super().__init__()
        self._metric = metric
        self._labels = labels

    def __missing__(self, key: tuple[str, ...]) -> Any:
        child = self[key] = self._metric.labels(*(self._labels(*key) if self._labels else key))
        return child


_started: PrometheusRecorder | None = None
#: The process that said it could not start counting: once, not by every middleware made (a child
#: forked from it says so again, or counts: the directory may be there by then).
_refused_in: int | None = None
_starting = threading.Lock()


def record() -> PrometheusRecorder | None:
    """Count every event of this process in the default registry from now on (idempotent). A
    process that cannot write ``PROMETHEUS_MULTIPROC_DIR`` (removed, another user's) counts
    nothing, with one warning, and goes on: None (a worker started so failed to boot); a later
    call, or one in a child forked from it, counts once the directory takes its files."""
    global _started, _refused_in
    with _starting:
        if _started is None:
            try:
                if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
                    # prometheus_client's multiprocess mode all the same: its files in the working
                    # directory, which no scrape sums (registry() takes it for unset).
                    raise NotADirectoryError("set but empty: name a directory, or unset it")
                _started = PrometheusRecorder()
            except OSError as error:
                if _refused_in != os.getpid():
                    _refused_in = os.getpid()
                    log.warning("metrics not recorded by this process: PROMETHEUS_MULTIPROC_DIR=%r cannot be "
                                "written (%r)", os.environ.get("PROMETHEUS_MULTIPROC_DIR"), error)
                return None
        metrics.use(_started)
        return _started


def registry() -> CollectorRegistry:
    """The registry to expose: every worker's metrics when ``PROMETHEUS_MULTIPROC_DIR`` is set, else this process's."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    collected = _SummedRegistry()
    _LiveWorkersCollector(collected, directory)
    return collected


def exposition(names: Sequence[str] = ()) -> tuple[bytes, str]:
    """:func:`registry`'s metrics in Prometheus' text format, those ``names`` name alone if any
    (a scrape's ``name[]``), and their content type."""
    exposed = registry()
    return generate_latest(exposed.restricted_registry(names) if names else exposed), CONTENT_TYPE_LATEST


class _SummedRegistry(CollectorRegistry):
    """A registry whose collector names its metrics only as it reads the files of the moment: a
    scrape asking for some by name (``name[]=...``) is answered from what it collects, where
    prometheus_client's looks them up among the names known as the collector was registered,
    none (an empty answer)."""

    def restricted_registry(self, names: Iterable[str]) -> Any:
        return _Restricted(self, set(names))


class _Restricted:
    """The samples of ``registry`` named ``names``."""

    def __init__(self, registry: CollectorRegistry, names: set[str]) -> None:
        self._registry = registry
        self._names = names

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            samples = [sample for sample in family.samples if sample.name in self._names]
            if samples:
                restricted = Metric(family.name, family.documentation, family.type, family.unit)
                restricted.samples = samples
                yield restricted


class _LiveWorkersCollector(multiprocess.MultiProcessCollector):
    """Every worker's files summed, the live gauges of the processes that are gone left out: only
    gunicorn's ``child_exit`` hook drops them (``examples/gunicorn_metrics.py``), and a worker that
    uvicorn replaced, or one killed under a server without the hook, stayed in the sum for good.
    A directory removed sums nothing, where prometheus_client's collector raised, and a worker
    started meanwhile failed to boot."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:  # not the parent's, which checks the directory
        self._path = path
        registry.register(self)

    def collect(self) -> Iterable[Any]:
        for gauge in glob.glob(os.path.join(self._path, "gauge_live*_*.db")):
            pid = os.path.basename(gauge)[:-len(".db")].rpartition("_")[2]
            if pid.isdigit() and not _running(int(pid)):
                with contextlib.suppress(FileNotFoundError):  # another worker's scrape was first
                    multiprocess.mark_process_dead(int(pid), self._path)
        return super().collect()


def _running(pid: int) -> bool:
    """True if the process ``pid`` exists (on this host: the directory is the server's own)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


class MetricsEndpoint:
    """Answers ``GET path`` (and ``HEAD``) with the metrics in Prometheus' text format, any other
    method there with a 405; passes the other paths to ``app``.

    Put it behind a proxy rule or on an internal port: it shows the trackers' addresses and the
    site's traffic to whoever can reach it.
    """

    def __init__(self, app: WSGIApp, *, path: str = "/metrics") -> None:
        self.app = self.__wrapped__ = app  # (__wrapped__: what a middleware around it finds inside)
        self.path = _metrics_path(path)
        self._exposition = make_wsgi_app(registry())
        record()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == self.path:
            method = environ.get("REQUEST_METHOD")
            if method == "HEAD":  # a GET's headers, without the body (RFC 9110 9.3.2)
                self._exposition({**environ, "REQUEST_METHOD": "GET"}, start_response)
                return []
            if method != "GET":  # prometheus_client's own 405 and OPTIONS leave out HEAD
                start_response(METHOD_NOT_ALLOWED.status, METHOD_NOT_ALLOWED.headers.copy())
                return [METHOD_NOT_ALLOWED.body]
            return self._exposition(environ, start_response)
        return self.app(environ, start_response)


def filter_factory(global_conf: dict[str, str], **local_conf: str) -> Any:
    """PasteDeploy: ``[filter:metrics]`` with ``use = egg:mogile_middleware#metrics`` (``path``
    optional; a global ``path`` is the option, as in :func:`mogile_middleware.paste.filter_factory`);
    ``ValueError`` for another option or a path that is not one, at load time."""
    unknown = sorted(set(local_conf) - {"path"})
    if unknown:
        raise ValueError(f"unknown metrics option(s) {', '.join(unknown)}; the option is: path")
    path = _metrics_path(local_conf.get("path", global_conf.get("path", "/metrics")))
    return lambda app: MetricsEndpoint(app, path=path)


def _metrics_path(path: object) -> str:
    """``path`` if a request can ask for it (``/metrics``); a ValueError naming it otherwise."""
    # A query or a fragment is never part of a request's path; a non-ASCII one would have to match
    # the UTF-8 a client sends as PATH_INFO's latin-1.
    if not isinstance(path, str) or not path.startswith("/") or not path.isascii() or not path.isprintable() \
            or any(character in path for character in " ?#"):
        raise ValueError(f"the metrics path must be a URL path such as '/metrics', not {path!r}")
    return path
