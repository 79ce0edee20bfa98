"""The events an operator counts, handed to one process-wide :class:`Recorder`.

The package calls the methods of :data:`recorder` where each event happens; the default recorder
does nothing, so the package depends on no metrics library. :mod:`mogile_middleware.prometheus`
is a recorder for ``prometheus_client``; any other collector subclasses :class:`Recorder`,
overrides what it counts and installs itself with :func:`use`. Methods are called on the request
path, from any thread and from event loops: they must be quick and must not raise.
"""

from __future__ import annotations


class Recorder:
    """Receives every event; each method does nothing here."""

    def request(self, mode: str, status: str) -> None:
        """A request under the prefix was answered. ``mode`` is ``"perlbal"`` or ``"nginx"`` when the
        answer sends the proxy to the replicas, else ``"serve"`` (bodies, 304s, errors); ``status``
        is the status line (``"200 OK"``)."""

    def bytes_served(self, count: int) -> None:
        """``count`` bytes of a body streamed in serve mode reached the server (per response, at its end)."""

    def tracker_call(self, tracker: str, command: str, seconds: float, outcome: str) -> None:
        """One command on one tracker (``host:port``) took ``seconds``. ``outcome`` is ``"ok"``,
        ``"error"`` (an ``ERR`` reply, such as ``unknown_key``) or ``"failed"`` (no usable reply:
        refused, timed out, cut or garbled; the next tracker is tried when that is safe)."""

    def tracker_skipped(self, tracker: str) -> None:
        """A request skipped ``tracker`` because it is marked dead, or because another request is
        asking whether it is back."""

    def cache_hit(self) -> None:
        """The path cache answered with fresh paths."""

    def cache_miss(self) -> None:
        """The path cache had no fresh paths: the trackers are asked (or a lookup in progress joined)."""

    def cache_stale(self) -> None:
        """No tracker answered and the path cache served paths past their time (stale-if-error)."""

    def cache_invalidated(self) -> None:
        """A key was dropped from the path cache (it changed, or its replicas were gone)."""

    def cache_size(self, entries: int) -> None:
        """The in-process path caches of the process now hold ``entries`` keys in all (a shared
        backend reports none)."""

    def body_cache(self, hit: bool) -> None:
        """The body cache was asked for a small file's bytes: kept (``hit``), or to be read from a node."""

    def replica_failover(self) -> None:
        """A replica failed (refused, errored, or answered another status or length), so the next
        one, or the trackers, are asked."""

    def upload(self, outcome: str, size: int) -> None:
        """An upload ended: ``"stored"``, ``"failed"`` (the key kept its old data) or ``"unknown"``
        (the answer to ``create_close`` was lost); ``size`` is the bytes sent, as far as known."""


#: The recorder every part of the package reports to (see :func:`use`).
recorder = Recorder()


def use(new: Recorder | None) -> Recorder:
    """Report every event to ``new`` from now on (``None``: to none); returns the one replaced.

    Call it before a server forks its workers, or in each worker: the recorder is per process.
    """
    global recorder
    previous, recorder = recorder, new if new is not None else Recorder()
    return previous
