"""Connections to MogileFS trackers: kept open, shared between threads, failed over.

:class:`TrackerPool` sends one request line and reads one reply line on a kept-open connection
to the first tracker that is not marked dead. A tracker that cannot be reached is skipped for
``dead_seconds``; a command that is safe to repeat is retried on the next tracker when its
connection fails midway. Connections are plain ``socket`` objects (so gevent patching applies),
dropped in a child process after ``fork()``, and discarded after any error.

``io_timeout`` is a deadline, not an idle timeout: a tracker that sends its reply one byte at a
time cannot hold a request longer than a silent one (see :class:`TrackerPool`).

The failover itself has no I/O: :meth:`TrackerPoolBase.steps` yields the steps of a request
(take an idle connection, dial, ask) for a pool to carry out, so that this pool and the asyncio
one (:mod:`mogile_middleware.async_tracker`) share one copy of it.
"""

from __future__ import annotations

import codecs
import errno
import io
import ipaddress
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any, NamedTuple, Protocol, TypeVar, Union

from . import metrics
from .exceptions import OutcomeUnknownError, ProtocolError, TrackerError, TrackerUnavailableError
from .deadline import DeadlineReader, checked_seconds, readable_now
from .forking import renew_in_child
from .nodepool import IdlePool
from .protocol import ArgValue, Reply, encode_request, parse_reply

Address = tuple[str, int]

log = logging.getLogger("mogile_middleware")

# getaddrinfo loads the idna codec on its first use, which a process out of file descriptors
# could not do: its threads then met "unknown encoding: idna" (a 500). Loaded here instead.
codecs.lookup("idna")

#: Failures of this process, not of the tracker asked: out of file descriptors (a worker with many
#: downloads open) or memory. The tracker is not marked dead for them, which made every request
#: fail for ``dead_seconds`` after the shortage ended.
_OWN_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def own_shortage(error: BaseException | None) -> bool:
    """True if ``error`` is :data:`_OWN_SHORTAGES`'s, or came while this process can open no file:
    a tracker's name then fails to resolve (``/etc/hosts`` unread) with a resolver's code instead."""
    if not isinstance(error, OSError):
        return False
    if error.errno in _OWN_SHORTAGES:
        return True
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as opening:
        return opening.errno in _OWN_SHORTAGES
    return False


#: A reply longer than this is refused (1000 listed keys of 255 bytes, each up to 3x escaped).
MAX_REPLY_BYTES = 4 * 1024 * 1024

#: Commands whose repetition changes nothing a client sees, so a failure midway can be retried
#: elsewhere. ``create_open`` only reserves a file number: mogilefsd purges one never closed an
#: hour later (``Worker/Delete.pm``), so an upload is not lost to a tracker that hangs.
#: ``updateclass`` (a file's class, what ``update_class`` sends) to the class the file already has
#: answers ``OK`` (``cmd_updateclass``); the admin's ``update_class`` sets a class's copies to the same.
IDEMPOTENT_COMMANDS = frozenset(
    {"noop", "get_paths", "file_info", "file_debug", "list_keys", "list_fids", "get_domains",
     "get_hosts", "get_devices", "server_settings", "create_open", "updateclass", "update_class"}
)
#: Commands whose answer waits on a storage node (mogilefsd checks the new file's size there, and
#: its MD5 when asked to): a tracker that misses their deadline is not marked dead for it.
ANSWERED_AFTER_STORAGE = frozenset({"create_close"})
#: How fast a tracker is assumed to read a new file back to check its MD5 (``create_close`` with
#: ``checksumverify``): the deadline grows by the file's size at this pace. mogilefsd 2.73 read
#: 440 MiB/s from a local node; a busy disk across a network is slower.
VERIFIED_BYTES_PER_SECOND = 16 * 1024 * 1024
#: New connections on which a command safe to repeat is sent again when the tracker closes one
#: before its reply (mogilefsd does, to an unrelated request, after a rename onto a taken key).
CLOSED_RETRIES = 2
#: Seconds a pool keeps a connection unused (:class:`~.nodepool.IdlePool`: the one used last is
#: taken first). A steady load of any number of threads goes on reusing its own, while those a
#: burst opened (hundreds of gevent greenlets) sink unused and are closed as the pool is next used;
#: a connection a firewall dropped while idle is not the one a request waits on.
IDLE_SECONDS = 30.0
_NOOP = encode_request("noop", None)
#: A tracker found failing again within this long of its dead time's end (or ``dead_seconds``,
#: if longer) is still down, not down anew: its outage is logged once, however short ``dead_seconds``.
SAME_OUTAGE_SECONDS = 5.0
#: What :meth:`TrackerPoolBase._probe_steps` says of a tracker another request is asking already.
_ASKED_BY_ANOTHER = "another request is asking whether it is back"
#: The outcome of a call its caller gave up (an ASGI client that left): none to count, as no
#: answer, error or failure was seen.
_ABANDONED = "abandoned"


#: The port of a tracker given without one: mogilefsd's.
DEFAULT_PORT = 7001
#: A host name or an IPv4 address: labels of 1 to 63 letters, digits, hyphens and underscores
#: joined by dots (a final dot allowed), 253 characters at most. The resolver refuses an empty or
#: longer label with a UnicodeError, not an OSError: "tracker1..example.com" is refused here.
_HOST_NAME = re.compile(r"(?!.{254})[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")


def parse_address(tracker: str | Address) -> Address:
    """``"host:port"`` (or ``"host"``, port 7001; ``"[::1]:7001"``, or ``"::1"`` with no port) as a
    ``(host, port)`` pair; a ValueError for anything else (a URL, two addresses run together)."""
    if isinstance(tracker, tuple):
        if len(tracker) != 2 or not isinstance(tracker[0], str) or isinstance(tracker[1], bool) \
                or not isinstance(tracker[1], (int, str)):
            raise ValueError(f"tracker address {tracker!r} is not a (host, port) pair")
        address = host_port(tracker[0], str(tracker[1]))
    elif not isinstance(tracker, str):
        raise ValueError(f"tracker address {tracker!r} is not a host:port string or a (host, port) pair")
    else:
        address = split_address(tracker.strip(), DEFAULT_PORT)
    if address is None:
        raise ValueError(f"tracker address {tracker!r} is not host:port")
    return address


def split_address(text: str, default_port: int) -> Address | None:
    """``"host:port"``, ``"host"`` (``default_port``), ``"[::1]:port"``, ``"[::1]"`` or a bare IPv6
    address (its colons are its own: no port is read from it) as a ``(host, port)`` pair, the host
    without brackets; None for anything else."""
    if text.count(":") > 1 and not text.startswith("["):
        host, port = text, str(default_port)
    else:
        host, sep, port = text.rpartition(":") if not text.endswith("]") else ("", "", "")
        if not sep:
            host, port = text, str(default_port)
    return host_port(host, port)


def host_port(host: str, port: str) -> Address | None:
    """``(host, port)`` for a host name, an IPv4 address or an IPv6 one (bracketed or not) and a
    port from 1 to 65535 in ASCII digits; None otherwise."""
    bracketed = host.startswith("[") and host.endswith("]")
    name = host[1:-1] if bracketed else host
    named = _is_ipv6(name) if bracketed else is_host(name)
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536 or not named:
        return None
    return name, int(port)


def is_url_authority(netloc: str) -> bool:
    """True for a URL's ``host``, ``host:port``, ``[IPv6]`` or ``[IPv6]:port`` exactly (RFC 3986
    3.2.2), a zone written ``%25``: Python's ``urlsplit`` reads ``[::1]x:7500`` and ``[::1]]:7500``
    as the host ``::1``, which is not the host the URL names (nginx refuses it)."""
    if netloc.count(":") > 1 and not netloc.startswith("["):
        return False  # an IPv6 address in a URL is bracketed
    return split_address(netloc.replace("%25", "%"), 80) is not None


def is_host(name: str) -> bool:
    """True for a host name, an IPv4 address or an IPv6 one (without brackets). Digits and dots
    alone are an IPv4 address the resolver reads (``127.0.0.1``, as ``inet_aton``: ``127.1`` too),
    never a name: ``999.1.1.1`` failed at each connection, the name of no host."""
    if name.rstrip(".").replace(".", "").isdigit() and name.isascii():
        return _is_ipv4(name)
    return bool(_HOST_NAME.fullmatch(name)) or _is_ipv6(name)


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    """True for an IPv6 address, with a zone (``fe80::1%eth0``) the resolver takes: it encodes the
    whole text as a host name, whose labels IDNA holds to 63 characters (else a UnicodeError)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    zone = address.scope_id if isinstance(address, ipaddress.IPv6Address) else ""
    if zone is None:
        return True
    try:
        return bool(zone and _HOST_NAME.fullmatch(zone) and text.encode("idna"))
    except UnicodeError:
        return False


def parse_trackers(trackers: str | Iterable[str | Address]) -> list[Address]:
    """Tracker addresses from a list or a whitespace- or comma-separated string."""
    if not isinstance(trackers, (str, Iterable)) or isinstance(trackers, (bytes, bytearray)):
        raise ValueError(f"trackers must be host:port addresses, in a list or a string, not {trackers!r}")
    if isinstance(trackers, tuple) and len(trackers) == 2 and isinstance(trackers[1], int):
        raise ValueError(f"trackers {trackers!r}: a lone (host, port) pair; give a list of them")
    items = trackers.replace(",", " ").split() if isinstance(trackers, str) else list(trackers)
    try:
        addresses = [parse_address(item) for item in items]
    except ValueError as error:
        if isinstance(trackers, str) and len(items) > 1:  # "host: 7001" is two items, neither an address
            raise ValueError(f"{error} (in {trackers!r}, whose commas and spaces separate addresses)") from None
        raise
    if not addresses:
        raise ValueError("no tracker address given")
    return addresses


class TrackerConnection:
    """One TCP connection to a tracker: send a request line, read a reply line.

    :param io_timeout: seconds a :meth:`roundtrip` without a ``deadline`` may take, send and reply.
    """

    def __init__(self, address: Address, connect_timeout: float, io_timeout: float) -> None:
        self.address = address
        self.io_timeout = io_timeout
        self._sock = socket.create_connection(address, timeout=connect_timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._raw = DeadlineReader(self._sock)
        self._reader = io.BufferedReader(self._raw)
        self._replied = 0  # bytes of the reply lines read: any more received is a line nobody asked for

    def is_stale(self) -> bool:
        """True if the idle connection has something to read: the tracker closed it or misspoke
        (a line after its reply, which the reader's buffer may hold already)."""
        return self._raw.received > self._replied or readable_now(self._sock)

    def roundtrip(self, request: bytes, deadline: float | None = None) -> bytes:
        """Send one request line and return the reply line, raising on EOF or an oversized line.

        The whole line must have arrived by ``deadline`` (a :func:`time.monotonic` time; by default
        ``io_timeout`` from now), else :class:`TimeoutError`; after it the connection is unusable.
        """
        self._raw.set_deadline(time.monotonic() + self.io_timeout if deadline is None else deadline)
        self._sock.sendall(request)  # its timeout counts for the whole line, not for each piece
        line = self._reader.readline(MAX_REPLY_BYTES + 1)
        if not line:
            raise ConnectionResetError("tracker closed the connection")
        if not line.endswith(b"\n"):
            if len(line) > MAX_REPLY_BYTES:
                raise ProtocolError(f"tracker reply longer than {MAX_REPLY_BYTES} bytes")
            raise ProtocolError(f"tracker reply cut short: {line[:80]!r}")
        self._replied += len(line)
        return line

    def close(self) -> None:
        """Close the socket; the connection is not used again."""
        self._reader.close()
        self._sock.close()


class TakeIdle(NamedTuple):
    """A step of a request: an idle connection to ``address`` that passed the stale check, or ``None``."""

    address: Address


class Dial(NamedTuple):
    """A step of a request: a new connection to ``address`` (an :class:`OSError` if refused or late)."""

    address: Address


class Ask(NamedTuple):
    """A step of a request: the parsed reply to ``line`` on ``connection``, whole by ``deadline`` (a
    :func:`time.monotonic` time; ``None``: ``io_timeout`` from now). The connection is kept after an
    ``OK`` or ``ERR`` reply and closed after anything else."""

    connection: Any
    line: bytes
    deadline: float | None


#: What a pool carries out for :meth:`TrackerPoolBase.steps`: the only I/O of a request.
Step = Union[TakeIdle, Dial, Ask]

#: What a command's caller reads from its reply (:func:`~mogile_middleware.client.paths_of`...),
#: within the request: a reply it cannot read is a tracker misspeaking, passed over as one that
#: closes is.
ReadReply = Callable[[Reply], Any]

#: The steps of one request, ending with its reply (as read) and the tracker that answered.
Steps = Generator[Step, Any, "tuple[Any, Address]"]


class StepRunner:
    """Drives :data:`Steps`: iterating gives each step; set ``result`` or ``error`` before the next.

    At the end ``value`` holds what the steps returned. It lets a blocking pool and an asyncio pool
    run the same failover logic, each doing the I/O its own way.
    """

    def __init__(self, steps: Steps) -> None:
        self._steps = steps
        self.result: Any = None
        self.error: Exception | None = None
        self.value: tuple[Any, Address]  # set when the steps end

    def __iter__(self) -> StepRunner:
        return self

    def __next__(self) -> Step:
        result, error, self.result, self.error = self.result, self.error, None, None
        try:
            return self._steps.send(result) if error is None else self._steps.throw(error)
        except StopIteration as done:
            self.value = done.value
            raise StopIteration from None

    def close(self) -> None:
        """End the steps where they are (a request interrupted), so that their ``finally`` runs."""
        self._steps.close()


class _Closeable(Protocol):
    def close(self) -> None: ...


class kept_if_answered:  # noqa: N801 (a class only because it is cheaper than a generator; read as a function)
    """Around a roundtrip: ``give_back`` the connection after an ``OK`` or ``ERR`` reply, close it
    after anything else (a cut reply, a timeout, a cancellation: the rest of the reply may come)."""

    __slots__ = ("connection", "give_back")

    def __init__(self, connection: _Closeable, give_back: Callable[[Any], None]) -> None:
        self.connection = connection
        self.give_back = give_back

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        if kind is None or issubclass(kind, TrackerError):
            self.give_back(self.connection)
        else:
            self.connection.close()


class TrackerPoolBase:
    """What the blocking and the asyncio tracker pools share, without I/O: the tracker list, the
    dead-tracker table and the failover of a request (:meth:`steps`). See :class:`TrackerPool`
    for the arguments."""

    def __init__(
        self,
        trackers: str | Iterable[str | Address],
        *,
        connect_timeout: float = 1.0,
        io_timeout: float = 5.0,
        dead_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addresses = parse_trackers(trackers)
        self._names = {address: describe_address(*address) for address in self.addresses}
        self.connect_timeout = checked_seconds("connect_timeout", connect_timeout)
        self.io_timeout = checked_seconds("io_timeout", io_timeout)
        self.dead_seconds = checked_seconds("dead_seconds", dead_seconds, zero=True)
        self._clock = clock
        self._reset()
        renew_in_child(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {', '.join(self._names.values())}>"

    def _reset(self) -> None:
        """Start with no tracker marked dead (and, in a pool, no connection)."""
        # A tracker stays here after its dead time, until it answers again (see _probe_steps).
        self._dead_until: dict[Address, float] = {}
        self._probing: set[Address] = set()
        self._table_lock = threading.Lock()  # for _probing, and for a tracker's first marking

    def renew_after_fork(self) -> None:
        # A tracker the parent's threads were asking whether it is back is asked by nobody here.
        self._probing = set()
        self._table_lock = threading.Lock()

    def live_trackers(self) -> list[Address]:
        """The trackers not marked dead now, in the configured order."""
        now = self._clock()
        return [address for address in self.addresses if self._dead_until.get(address, 0.0) <= now]

    def mark_dead(self, address: Address, error: BaseException | None = None) -> None:
        """Skip ``address`` for ``dead_seconds`` and drop its idle connections. One of several
        trackers is logged, with ``error``, once an outage (a lone tracker's failure is each
        request's error, which its caller reports): not again while it fails as it is asked again
        (:meth:`_still_down`), but again once it was left unasked longer, the other trackers
        answering (it may have been back meanwhile). Not for a shortage of this process's own
        (:func:`own_shortage`)."""
        if own_shortage(error):
            return
        with self._table_lock:  # threads failing on one tracker at once: one of them logs it
            known = self._still_down(address)
            self._dead_until[address] = self._clock() + self.dead_seconds
        self._drop_idle(address)
        if not known and len(self._names) > 1:  # several trackers, not one named twice
            reason = "" if error is None else f" ({error or type(error).__name__})"
            skipped = f": not asked for {self.dead_seconds:g}s" if self.dead_seconds else ""
            log.warning("tracker %s failed%s%s", self._names[address], reason, skipped)

    def _drop_idle(self, address: Address) -> None:
        """Close the idle connections to ``address`` (a pool's own bookkeeping)."""
        raise NotImplementedError

    def steps(self, command: str, args: Mapping[str, ArgValue] | None, read: ReadReply | None = None) -> Steps:
        """The steps of one request (see :meth:`TrackerPool.request`), for a pool to carry out."""
        line = encode_request(command, args)
        retry_midway = command in IDEMPOTENT_COMMANDS
        may_take_long = command in ANSWERED_AFTER_STORAGE
        seconds = self.io_timeout + _verifying_seconds(command, args)
        candidates = self.live_trackers()
        if len(candidates) < len(self.addresses):
            for address in self.addresses:
                if address not in candidates:
                    metrics.recorder.tracker_skipped(self._names[address])
        if not candidates:
            raise TrackerUnavailableError(
                f"every tracker is marked dead for up to {self.dead_seconds:g}s: {self._describe()}"
            )
        failures: list[str] = []
        queue, deferred = list(candidates), set()
        failed_over = False  # whether a tracker taken for alive failed this request
        while queue:
            address = queue.pop(0)
            if address in self._dead_until:
                # Another request asking it already: the other trackers first. Then ask it too,
                # not to fail a request it may answer, if one of them failed this request (a
                # tracker going down) or if it was marked dead long ago (nothing needed it since);
                # not if its dead time has just ended, as every dead_seconds while every tracker
                # hangs: the one request asking is enough.
                alone = address not in deferred or self._dead_lately(address) and not failed_over
                not_back = yield from self._probe_steps(address, alone=alone)
                if not_back is _ASKED_BY_ANOTHER:
                    if address in deferred:  # given up, as while it was marked dead
                        metrics.recorder.tracker_skipped(self._names[address])
                    else:
                        deferred.add(address)
                        queue.append(address)
                        continue
                if not_back:
                    failures.append(f"{self._names[address]}: {not_back}")
                    continue
            started, outcome = time.monotonic(), "failed"
            try:
                reply = yield from self._steps_on(address, line, retry_midway, may_take_long, seconds, read)
                outcome = "ok"
                return reply, address
            except TrackerError:
                outcome = "error"
                raise
            except GeneratorExit:
                outcome = _ABANDONED
                raise
            except _SentAndLost as lost:
                raise OutcomeUnknownError(
                    f"{self._names[address]} failed after '{command}' was sent ({lost.__cause__}); "
                    "it may or may not have been carried out"
                ) from lost.__cause__
            except (OSError, ProtocolError) as error:  # an idempotent command: the next tracker may answer
                failed_over = True
                failures.append(f"{self._names[address]}: {error or type(error).__name__}")
            finally:
                if outcome is not _ABANDONED:
                    metrics.recorder.tracker_call(self._names[address], command, time.monotonic() - started, outcome)
        raise TrackerUnavailableError("no tracker answered: " + "; ".join(failures))

    def _still_down(self, address: Address) -> bool:
        """True if ``address`` is marked dead, or its dead time ended less than
        :data:`SAME_OUTAGE_SECONDS` (or ``dead_seconds``) ago: failing now, it has not been back."""
        until = self._dead_until.get(address)
        return until is not None and self._clock() - until < max(self.dead_seconds, SAME_OUTAGE_SECONDS)

    def _dead_lately(self, address: Address) -> bool:
        """True if ``address`` is marked dead, or its dead time ended less than ``dead_seconds`` ago."""
        until = self._dead_until.get(address)
        return until is not None and self._clock() - until < self.dead_seconds

    def _probe_steps(self, address: Address, alone: bool) -> Generator[Step, Any, str | None]:
        """Whether a tracker whose dead time has passed is back: ``None`` once it answered a
        ``noop`` within ``connect_timeout`` (so one that still hangs costs that, not
        ``io_timeout``), else why not. ``alone``: unless another request is asking it already
        (then :data:`_ASKED_BY_ANOTHER`, and this one tries the other trackers first)."""
        until = self._dead_until.get(address)
        if until is None:
            return None  # another request has heard from it
        if until > self._clock():  # marked dead again meanwhile
            metrics.recorder.tracker_skipped(self._names[address])
            return "marked dead"
        if alone:
            with self._table_lock:
                if address in self._probing:
                    return _ASKED_BY_ANOTHER
                self._probing.add(address)
        started, outcome = time.monotonic(), "ok"
        try:
            connection = yield Dial(address)
            yield Ask(connection, _NOOP, started + min(self.connect_timeout, self.io_timeout))
        except TrackerError:
            outcome = "error"  # an answer all the same
        except (OSError, ProtocolError) as error:
            outcome = "failed"
            still = "still " if self._still_down(address) else ""
            self.mark_dead(address, error)
            return f"{still}no answer ({error or type(error).__name__})"
        except GeneratorExit:
            outcome = _ABANDONED
            raise
        finally:
            if outcome is not _ABANDONED:
                metrics.recorder.tracker_call(self._names[address], "noop", time.monotonic() - started, outcome)
            if alone:
                with self._table_lock:
                    self._probing.discard(address)
        self._dead_until.pop(address, None)
        return None

    def _steps_on(self, address: Address, line: bytes, retry_midway: bool, may_take_long: bool,
                  seconds: float, read: ReadReply | None) -> Generator[Step, Any, Any]:
        """One request to one tracker, its reply due within ``seconds`` and read by ``read``: on a
        pooled connection, else on a new one."""
        deadline = None
        connection = yield TakeIdle(address)
        if connection is not None:
            deadline = time.monotonic() + seconds
            try:
                reply = yield Ask(connection, line, deadline)
            except (OSError, ProtocolError) as error:
                late = time.monotonic() >= deadline  # too slow, not closed: a new connection would be no faster
                if late and not may_take_long:
                    self.mark_dead(address, error)
                if not retry_midway:
                    raise _SentAndLost() from error
                if late:
                    raise TimeoutError(f"no reply within {seconds:g}s") from error
                # The tracker may close kept-open connections at any time: try once on a new one.
            else:
                return _read(reply, read, retry_midway)
        # mogilefsd closes a new connection too, when one of its workers misspoke to another client
        # (a rename onto a taken key): a command safe to repeat is sent on a few more.
        closes_allowed = CLOSED_RETRIES if retry_midway else 0
        while True:
            try:
                connection = yield Dial(address)
            except OSError as error:
                self.mark_dead(address, error)
                raise
            if deadline is None:
                deadline = time.monotonic() + seconds
            try:
                reply = yield Ask(connection, line, deadline)
            except (OSError, ProtocolError) as error:
                # A tracker that accepts and never answers is skipped. One that closes a new
                # connection or cuts its reply is alive: only this request fails there.
                if isinstance(error, TimeoutError) and not may_take_long:
                    self.mark_dead(address, error)
                if not retry_midway:
                    raise _SentAndLost() from error
                if not closes_allowed or not isinstance(error, ConnectionError) or time.monotonic() >= deadline:
                    raise
                closes_allowed -= 1
            else:
                return _read(reply, read, retry_midway)

    def _describe(self) -> str:
        return ", ".join(self._names.values())


def _read(reply: Reply, read: ReadReply | None, retry_midway: bool) -> Any:
    """``reply`` as ``read`` reads it, or as it came. A whole reply it cannot read (a
    :class:`ProtocolError`) is the tracker misspeaking, not a connection closed: the request is not
    sent there again; a command safe to repeat goes to the next tracker, any other was carried
    out or not."""
    if read is None:
        return reply
    try:
        return read(reply)
    except ProtocolError as error:
        if not retry_midway:
            raise _SentAndLost() from error
        raise


def _verifying_seconds(command: str, args: Mapping[str, ArgValue] | None) -> float:
    """The time a tracker may take beyond ``io_timeout`` to answer ``command``: reading a new file
    back to check its MD5, for a ``create_close`` with ``checksumverify``."""
    if command != "create_close" or not args or not args.get("checksumverify"):
        return 0.0
    return int(args.get("size") or 0) / VERIFIED_BYTES_PER_SECOND


class TrackerPool(TrackerPoolBase):
    """Kept-open connections to a set of trackers, with a dead-tracker table and failover.

    :param trackers: ``"host:port"`` strings or ``(host, port)`` pairs, tried in order.
    :param connect_timeout: seconds to wait for a TCP connect; a dead tracker costs at most this.
    :param io_timeout: seconds from sending a command to a tracker until its whole reply line has
        arrived, however slowly it comes. The retry of an idempotent command on a new connection,
        after a kept-open one failed or a new one was closed before its reply, gets only what is
        left of the same deadline (plus its connect). A request thus costs at most ``io_timeout``
        and a ``connect_timeout`` per connection opened (four at most, with the ``noop`` that asks
        whether a tracker marked dead is back) per tracker tried (name resolution aside), and a
        tracker that misses the deadline of any command but ``create_close`` is marked dead.
    :param dead_seconds: how long a tracker that failed is skipped; then a ``noop`` asks whether it
        is back, within ``connect_timeout``.
    :param clock: a monotonic clock (tests pass a fake one).
    """

    def _reset(self) -> None:
        super()._reset()
        self._pid = os.getpid()
        self._idle: IdleTrackerConnections[TrackerConnection] = IdleTrackerConnections(self._clock)
        # A pool dropped unclosed (with its middleware, an application made per test) closes its
        # idle connections as it goes: left to the collector, each warned of an unclosed socket.
        self._closing = weakref.finalize(self, self._idle.close)

    def renew_after_fork(self) -> None:
        # Sockets inherited through fork() are shared with the parent: never used, and this
        # process's copies closed (the closer of the parent's kept them for the child's life).
        self._closing.detach()
        self._idle.forget_parents()
        self._reset()

    def _check_fork(self) -> None:
        # A fork that ran no at-fork hook (uWSGI's, by default) is seen at the first request.
        if os.getpid() != self._pid:
            self.renew_after_fork()

    def _drop_idle(self, address: Address) -> None:
        self._idle.drop(address)

    def _take_idle(self, address: Address) -> TrackerConnection | None:
        return self._idle.take(address)

    def _give_back(self, connection: TrackerConnection) -> None:
        self._idle.give(connection.address, connection)

    def request(
        self,
        command: str,
        args: Mapping[str, ArgValue] | None = None,
        read: ReadReply | None = None,
    ) -> tuple[Any, Address]:
        """Send ``command`` and return the decoded ``OK`` arguments (as ``read`` reads them) and
        the tracker that answered.

        Any tracker may answer any command, ``create_close`` too: mogilefsd keeps an open upload in
        its database, not in the tracker that answered ``create_open``. Raises the
        :class:`TrackerError` for an ``ERR`` reply and
        :class:`TrackerUnavailableError` when no tracker answered (refused, late, closed, or sent
        garbage or a reply ``read`` cannot read); :class:`OutcomeUnknownError` when a command that
        is not safe to repeat was sent and got no reply it could read.
        """
        self._check_fork()
        runner = StepRunner(self.steps(command, args, read))
        try:
            for step in runner:
                try:
                    runner.result = self._carry_out(step)
                except Exception as error:
                    runner.error = error
        finally:
            runner.close()
        return runner.value

    def _carry_out(self, step: Step) -> object:
        if isinstance(step, TakeIdle):
            return self._take_idle(step.address)
        if isinstance(step, Dial):
            return TrackerConnection(step.address, self.connect_timeout, self.io_timeout)
        return self._roundtrip(step.connection, step.line, step.deadline)

    def _roundtrip(self, connection: TrackerConnection, line: bytes, deadline: float | None) -> Reply:
        with kept_if_answered(connection, self._give_back):
            return parse_reply(connection.roundtrip(line, deadline))

    def close(self) -> None:
        """Close every idle connection (connections in use close when their request ends)."""
        self._idle.close()


class _TrackerConnection(_Closeable, Protocol):
    def is_stale(self) -> bool: ...


T = TypeVar("T", bound=_TrackerConnection)


class IdleTrackerConnections(IdlePool[T]):
    """A pool's idle connections (a blocking pool's, or an event loop's), per tracker: as many as
    the requests at once needed, until unused for :data:`IDLE_SECONDS`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(per_node=None, idle_seconds=IDLE_SECONDS, clock=clock)

    def usable(self, connection: T) -> bool:
        return not connection.is_stale()

    def discard(self, connection: T) -> None:
        connection.close()


class _SentAndLost(Exception):
    """A non-idempotent request was sent and its connection failed before the reply."""


def describe_address(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 address in brackets (RFC 3986), as ``--trackers`` and URLs write it
    (once: a tracker's ``hostip`` may be stored with them, as mogilefsd builds URLs from it)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
