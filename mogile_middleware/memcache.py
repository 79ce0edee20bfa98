"""A memcached :class:`~mogile_middleware.cache.CacheBackend`: one path cache for every process and host.

Needs the ``memcached`` extra (pymemcache). An entry is plain JSON holding only what was located
(replica URLs, ETag, length; or "no such key") and the cache key it was stored for, checked on
every read: an entry that does not validate, names another key, or holds a URL that is not a
clean ``http://`` one is a miss, logged, never a header and never code run. With ``secret`` every
entry is signed (HMAC-SHA256), so nobody without the secret can forge one. memcached should still
be reachable by the application hosts only: whoever can write to it can drop entries.

A key some process changed is not deleted but marked changed, and what a lookup found is stored
only over the entry it saw before it began (memcached's ``gets`` then ``cas``, or ``add`` over
none): a lookup that raced another process's write cannot put the old version back for every
process and host.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

try:
    from pymemcache.client.base import Client, check_key_helper
    from pymemcache.client.hash import HashClient
    from pymemcache.client.rendezvous import RendezvousHash
    from pymemcache.exceptions import MemcacheError, MemcacheIllegalInputError, MemcacheUnexpectedCloseError
except ModuleNotFoundError as error:  # the optional extra, which the options using this module name
    raise ModuleNotFoundError(f"mogile_middleware.memcache needs pymemcache: "
                              f"pip install 'mogile_middleware[memcached]' ({error})", name=error.name) from error

from .deadline import checked_seconds
from .forking import renew_in_child
from .locate import Location, is_clean_url
from .protocol import to_bytes
from .signing import secrets_given
from .throttle import ThrottledLog
from .tracker import describe_address, host_port, split_address

log = logging.getLogger("mogile_middleware")

T = TypeVar("T")

#: Seconds a server that failed is skipped (up to twice this: see ``_EveryServer``), so a dead
#: memcached costs one connect attempt per client this often rather than one per request.
DEAD_SECONDS = 5.0
#: Seconds between log lines of invalid entries found (each line counts those left out since).
INVALID_WARNING_INTERVAL = 60.0
#: Idle clients kept for the next request (more are made while more requests run at once).
MAX_IDLE_CLIENTS = 32
#: The most one call reads from a server: memcached's largest item by default (1 MiB), and the
#: lines around it. An entry takes a few hundred bytes; a larger item under its key is read, and
#: found invalid. pymemcache reads a line until its end, however long.
MAX_REPLY_BYTES = 1024 * 1024 + 1024

#: memcached reads a larger expiry as a Unix timestamp, so longer keeps are cut to this (30 days).
MAX_EXPIRE_SECONDS = 30 * 24 * 3600
#: An entry stored further ahead of this host's clock than this (a day) is invalid: it would stay
#: fresh for ever.
MAX_CLOCK_AHEAD_SECONDS = 24 * 3600
#: An entry stored further ahead of this host's clock than this is logged: hosts whose clocks NTP
#: keeps agree within milliseconds, and a skew stretches or ends the freshness of every entry.
CLOCKS_APART_SECONDS = 1.0

#: How long the mark of a changed key stays: longer than a lookup takes (the trackers' connect
#: and I/O timeouts), so that no lookup begun before the change can store what it found.
CHANGED_MARK_SECONDS = 30
#: The version of the entry format, first in every entry.
FORMAT = 1
#: The hex digits of a signature, before the entry it signs.
SIGNATURE_LENGTH = 64
#: In place of a location: the entry marks the key changed at its time (see :meth:`MemcachedBackend.delete`).
_CHANGED = "changed"
#: The version :meth:`MemcachedBackend._store` stores over whatever memcached holds.
_ANY = object()
_ETAG = re.compile(r"fid-([0-9]{1,20})|paths-[0-9a-f]{16}")
#: A replica URL as MogileFS makes them: a device directory and the fid's file, no query or fragment.
_REPLICA_URL = re.compile(r"http://[^?#]+/dev[0-9]+(?:/[0-9]+)*/0*([0-9]{1,20})\.fid")


class InvalidEntry(ValueError):
    """A memcached entry that is not one this backend wrote for the key asked."""


class MemcachedBackend:
    """Path cache entries (a :class:`~mogile_middleware.locate.Location`, or ``None`` for "no such
    key") in memcached, shared by gunicorn workers and application hosts.

    ``servers`` are ``host:port`` (port 11211 when left out), ``(host, port)`` pairs or unix socket
    paths: a list, or one string separated by commas or spaces. Entries are stored under
    ``prefix`` and the key; ``connect_timeout`` and ``timeout`` bound each connect and each call
    (seconds). Errors reach :class:`~mogile_middleware.cache.PathCache`, which keeps what it finds
    in process meanwhile; a failed server is skipped for :data:`DEAD_SECONDS` to twice that. ``secret``
    (bytes or text, the same on every host) signs the entries; a list of them rotates it: the
    first signs, each verifies. A ready pymemcache ``client`` is used as given, and must then be
    safe to share between the threads (and forks) of the application.
    """

    def __init__(self, servers: str | Sequence[str] = "127.0.0.1:11211", *, prefix: str = "mogile:",
                 connect_timeout: float = 0.2, timeout: float = 0.5, client: Any = None,
                 secret: str | bytes | Sequence[str | bytes] | None = None) -> None:
        if isinstance(servers, (bytes, bytearray)) or not isinstance(servers, (str, Iterable)):
            raise ValueError(f"servers must be host:port text or a list of them, not {servers!r}")
        items = servers.replace(",", " ").split() if isinstance(servers, str) else list(servers)
        if client is None and not items:
            raise ValueError("no memcached server given")
        self.servers = [_server(item) for item in items]
        self.prefix = checked_prefix(prefix)
        self.connect_timeout = checked_seconds("connect_timeout", connect_timeout)
        self.timeout = checked_seconds("timeout", timeout)
        self._given = client
        # A site changing its secret gives the new one second everywhere, then first, then alone: its
        # processes never meet entries they cannot read, each a lookup and a change to them.
        self._secrets = [] if secret is None else secrets_given("secret", secret)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[tuple[HashClient, _Deadline]] = []
        # Dropped, it closes its idle connections: left to the collector, each warned (a backend
        # made per test failed a suite run with ``filterwarnings = error``).
        weakref.finalize(self, _close_all, self._idle)
        renew_in_child(self)
        # Sites signing with different secrets over one memcached find each other's entries on every read.
        self._invalid_log = ThrottledLog(log, logging.WARNING, "ignoring an invalid memcached entry for %r: %r",
                                         INVALID_WARNING_INTERVAL, "invalid entries")
        self._ahead_log = ThrottledLog(log, logging.WARNING, "the memcached entry for %r was stored %.1f s ahead of "
                                       "this host's clock: the clocks of the hosts sharing memcached differ (see the "
                                       "README on clocks)", INVALID_WARNING_INTERVAL, "entries stored ahead")

    def __repr__(self) -> str:
        servers = "through the client given" if self._given is not None else ", ".join(
            server if isinstance(server, str) else describe_address(*server) for server in self.servers)
        return f"<MemcachedBackend {servers}, prefix {self.prefix!r}{', signed' if self._secrets else ''}>"

    def get(self, key: str) -> tuple[Location | None, float] | None:
        """``(location, stored_at)`` for ``key``, or None if memcached holds no valid entry for it
        (or the mark of a change)."""
        with self._client() as client:
            data = client.get(self._memcached_key(key))
        return self._entry(key, data)

    def get_versioned(self, key: str) -> tuple[tuple[Location | None, float] | None, bytes | None]:
        """What :meth:`get` gives, and the version of what memcached holds for ``key`` (its CAS
        token; None for nothing), which :meth:`set_if_unchanged` must find."""
        with self._client() as client:
            data, version = client.gets(self._memcached_key(key)) or (None, None)
        return self._entry(key, data), version

    def set(self, key: str, value: Location | None, stored_at: float, keep_seconds: float) -> None:
        """Keep ``value`` for ``keep_seconds`` (rounded up to whole seconds, as memcached counts)."""
        self._store(key, value, stored_at, keep_seconds, _ANY)

    def set_if_unchanged(self, key: str, value: Location | None, stored_at: float, keep_seconds: float,
                         version: bytes | None) -> None:
        """As :meth:`set`, only if memcached still holds the ``version`` that :meth:`get_versioned`
        gave before the lookup: not if a process marked the key changed meanwhile, or another
        lookup stored its finding, or memcached lost the entry."""
        self._store(key, value, stored_at, keep_seconds, version)

    def _store(self, key: str, value: Location | None, stored_at: float, keep_seconds: float,
               version: bytes | None | object) -> None:
        if keep_seconds <= 0:
            return  # memcached would read an expiry of 0 as "keep forever"
        if isinstance(value, Location) and not value.etag.startswith("fid-"):
            return  # its URLs name no fid: never read back as a replica's (see _location)
        expire = min(math.ceil(keep_seconds), MAX_EXPIRE_SECONDS)
        name, data = self._memcached_key(key), self._encode(key, value, stored_at)
        # noreply=False: wait for memcached's answer, so a failed store raises instead of vanishing.
        with self._client() as client:
            if version is _ANY:
                client.set(name, data, expire=expire, noreply=False)
            elif version is None:
                client.add(name, data, expire=expire, noreply=False)
            else:
                client.cas(name, data, version, expire=expire, noreply=False)

    def _encode(self, key: str, value: Location | None | str, stored_at: float) -> bytes:
        if value is not None and value is not _CHANGED and not isinstance(value, Location):
            raise TypeError(f"memcached keeps locations, not {type(value).__name__}")
        located = value if not isinstance(value, Location) else [
            value.key, list(value.paths), value.etag, value.length, value.complete]
        payload = json.dumps([FORMAT, key, stored_at, located], ensure_ascii=True, separators=(",", ":")).encode()
        return self._signature(payload) + payload

    def _entry(self, key: str, data: bytes | None) -> tuple[Location | None, float] | None:
        """The entry ``data`` holds for ``key``; None for none, the mark of a change, or an invalid
        one (logged)."""
        if data is None:
            return None
        try:
            entry = self._decode(key, data)
        except InvalidEntry as error:
            self._invalid_log.event(key, str(error))
            return None
        return None if entry[0] is _CHANGED else entry  # type: ignore[return-value]

    def _decode(self, key: str, data: bytes) -> tuple[Location | str | None, float]:
        if self._secrets:
            signature, data = data[:SIGNATURE_LENGTH], data[SIGNATURE_LENGTH:]
            valid = False
            for secret in self._secrets:  # every one, so the time taken does not say which matched
                valid |= hmac.compare_digest(signature, _signature(secret, data))
            if not valid:
                raise InvalidEntry("its signature does not match")
        try:
            version, stored_for, stored_at, located = json.loads(data)
            stored_at = float(stored_at) if isinstance(stored_at, (int, float)) else None
        # RecursionError: nesting deeper than the parser goes; OverflowError: no float holds the time.
        except (ValueError, TypeError, RecursionError, OverflowError) as error:
            raise InvalidEntry(f"not an entry of this format: {error!r}") from None
        if version != FORMAT or stored_for != key or stored_at is None:
            raise InvalidEntry("another format, or stored for another key")
        ahead = stored_at - time.time()
        if not (math.isfinite(stored_at) and ahead < MAX_CLOCK_AHEAD_SECONDS):
            raise InvalidEntry(f"stored at an impossible time: {stored_at!r}")  # it would never grow old
        if ahead > CLOCKS_APART_SECONDS:
            self._ahead_log.event(key, ahead)
        if located == _CHANGED:
            return _CHANGED, stored_at
        return (None if located is None else _location(located)), stored_at

    def _signature(self, payload: bytes) -> bytes:
        """The first secret's signature of ``payload`` (nothing without a secret)."""
        return _signature(self._secrets[0], payload) if self._secrets else b""

    def delete(self, key: str) -> None:
        """Forget ``key``, which a process changed: in its place, for :data:`CHANGED_MARK_SECONDS`,
        the mark of the change, a miss for every reader that no lookup begun before can replace
        (a lookup that began before the change but ended after it would bring the old version
        back for every process and host). A server this process marked dead is asked all the
        same, each time: it may be back, and a mark not left lets every host serve the old
        version (while it is down, a mark costs the writer up to ``timeout``)."""
        name, mark = self._memcached_key(key), self._encode(key, _CHANGED, time.time())
        with self._client() as client:
            try:
                client.set(name, mark, expire=CHANGED_MARK_SECONDS, noreply=False)
                return
            except MemcacheError:  # the key's server is marked dead: ask it directly
                if self._given is not None:
                    raise
        servers = {_node(server): server for server in self.servers}
        node = RendezvousHash(list(servers)).get_node(name)  # the key's server, as HashClient hashes
        deadline = _Deadline(self.timeout)
        direct = Client(servers[node], connect_timeout=self.connect_timeout, timeout=self.timeout, no_delay=True,
                        socket_module=_BoundedSockets(deadline))
        try:
            deadline.start()
            direct.set(name, mark, expire=CHANGED_MARK_SECONDS, noreply=False)
        finally:
            direct.close()

    def _memcached_key(self, key: str) -> str:
        return _key_of(self.prefix, key)

    def renew_after_fork(self) -> None:
        # The parent's sockets are shared with it: start afresh, never touch the inherited ones.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        _close_all(self._idle)  # its copies: the parent's connections stay open

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        """A client for one call, used by nobody else meanwhile: HashClient's bookkeeping of failed
        servers is not thread-safe. Idle ones are kept for later calls, by whatever thread or
        greenlet (a client per thread would be one per request under gevent)."""
        if self._given is not None:
            yield self._given
            return
        with self._lock:
            if os.getpid() != self._pid:  # forked with no at-fork hook run (uWSGI's default): as renew_after_fork
                self._pid = os.getpid()
                _close_all(self._idle)
            idle = self._idle.pop() if self._idle else None
        if idle is None:
            deadline = _Deadline(self.timeout)
            # retry_attempts=0 marks a failing server dead at once, for DEAD_SECONDS.
            client = HashClient(self.servers, hasher=_EveryServer, connect_timeout=self.connect_timeout,
                                timeout=self.timeout, no_delay=True, retry_attempts=0, dead_timeout=DEAD_SECONDS,
                                socket_module=_BoundedSockets(deadline))
        else:
            client, deadline = idle
        try:
            deadline.start()
            yield client
        finally:
            with self._lock:
                kept = os.getpid() == self._pid and len(self._idle) < MAX_IDLE_CLIENTS
                if kept:
                    self._idle.append((client, deadline))
            if not kept:
                client.close()


def _close_all(idle: list[tuple[HashClient, _Deadline]]) -> None:
    """Close the idle clients' connections (a process's own copies of their sockets) and forget them."""
    for client, _ in idle:
        client.close()
    idle.clear()


def checked_prefix(prefix: object) -> str:
    """``prefix`` if it can start the memcached key of every entry, else a ValueError naming it
    (one that cannot would turn every request into a logged miss)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be text, not {prefix!r}")
    try:
        check_key_helper(_key_of(prefix, ""), allow_unicode_keys=False)
    except MemcacheIllegalInputError as error:
        raise ValueError(f"prefix {prefix!r} cannot start a memcached key: {error}") from error
    return prefix


def _key_of(prefix: str, key: str) -> str:
    """The memcached key of ``key``'s entry. memcached keys are at most 250 bytes of ASCII without
    blanks or control characters, while MogileFS keys can be longer and hold any of them (any
    bytes): a digest fits every key."""
    return prefix + hashlib.sha1(to_bytes(key)).hexdigest()


class _Deadline:
    """When the call a client makes now must have ended (``timeout`` after :meth:`start`), and
    how much it read meanwhile."""

    __slots__ = ("timeout", "at", "received")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.at = 0.0
        self.received = 0

    def start(self) -> None:
        self.at, self.received = time.monotonic() + self.timeout, 0


class _BoundedSockets:
    """pymemcache's ``socket_module``: the :mod:`socket` module, but for connections whose calls
    end by one ``deadline`` (pymemcache's ``timeout`` bounds each read alone: a server sending a
    byte at a time, or bytes with no line end, held a worker for as long as it went on)."""

    def __init__(self, deadline: _Deadline) -> None:
        self.deadline = deadline

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    def socket(self, *args: Any) -> _BoundedSocket:
        # socket.socket as it is now: gevent's once it patched the module, whenever this was imported.
        return _BoundedSocket(socket.socket(*args), self.deadline)


class _BoundedSocket:
    """A connection to a memcached server that gives up when its call's deadline passes, or once
    the call has read more than :data:`MAX_REPLY_BYTES` (an OSError: pymemcache then closes it,
    and the client marks the server dead, as one that does not answer). Its errors name the server."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline
        self._server = "memcached"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def connect(self, address: Any) -> None:
        self._server = f"memcached at {address if isinstance(address, str) else describe_address(*address[:2])}"
        try:
            self._sock.connect(address)
        except OSError as error:
            raise self._named(error) from None

    def recv(self, size: int) -> bytes:
        data = self._by_deadline(self._sock.recv, size)
        if not data:  # the error pymemcache raises then, named
            raise MemcacheUnexpectedCloseError(f"{self._server} closed the connection")
        self._deadline.received += len(data)
        if self._deadline.received > MAX_REPLY_BYTES:
            raise OSError(f"{self._server} sent over {MAX_REPLY_BYTES} bytes for one call")
        return data

    def sendall(self, data: bytes) -> None:
        self._by_deadline(self._sock.sendall, data)

    def _by_deadline(self, call: Callable[[Any], T], argument: Any) -> T:
        left = self._deadline.at - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            return call(argument)
        except TimeoutError:
            raise TimeoutError(f"{self._server} did not answer within {self._deadline.timeout:g} s") from None
        except OSError as error:
            raise self._named(error) from None

    def _named(self, error: OSError) -> OSError:
        """``error`` (of the same class: ``ConnectionRefusedError``...) naming the server."""
        named = f"{self._server}: {error.strerror or error}"
        return TimeoutError(named) if error.errno is None else OSError(error.errno, named)


class _EveryServer(RendezvousHash):
    """pymemcache's hashing of keys over every server, dead or not: the keys of a server marked
    dead fail (a miss; a store or a drop not done) until it is back, rather than move to another
    server, where a copy stored meanwhile would outlive a writer's drop once the first is back."""

    def __init__(self) -> None:
        super().__init__()
        self._dead: set[str] = set()

    def add_node(self, node: str) -> None:
        self._dead.discard(node)
        super().add_node(node)

    def remove_node(self, node: str) -> None:
        self._dead.add(node)

    def get_node(self, key: str) -> str | None:
        node = super().get_node(key)
        if node in self._dead:  # named, where pymemcache says "All servers seem to be down right now"
            # pymemcache looks for servers back once DEAD_SECONDS have passed since it last looked:
            # a server marked dead just after a look waits for the next but one.
            raise MemcacheError(f"memcached at {_shown(node)} failed lately: not asked again for up to "
                                f"{2 * DEAD_SECONDS:g} s")
        return node


def _signature(secret: bytes, payload: bytes) -> bytes:
    """:data:`SIGNATURE_LENGTH` hex digits of HMAC-SHA256 over ``payload``."""
    return hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()


def _node(server: tuple[str, int] | str) -> str:
    """The name pymemcache's hashing knows ``server`` by."""
    return "%s:%s" % server if isinstance(server, tuple) else server


def _shown(node: str) -> str:
    """A server as :func:`_node` names it, written as servers are given (an IPv6 address in brackets)."""
    if node.startswith("/"):  # a unix socket's path
        return node
    host, _, port = node.rpartition(":")
    return describe_address(host, port)


#: The port of a memcached server given without one, as pymemcache takes it.
MEMCACHED_PORT = 11211


def _server(spec: str | tuple[str, int]) -> tuple[str, int] | str:
    """A memcached server as pymemcache takes it: ``host:port`` (port 11211 by default; an IPv6
    address bare or in brackets, as trackers are written), a ``(host, port)`` pair, or the path of
    a unix socket (``unix:`` before it or not); ValueError naming ``spec`` for anything else.
    pymemcache reads "a:1,b:2" as host "a:1,b", "::1" as host ":", "2001:db8::1:11212" as that
    address's port and a URL as a host: no lookup finds them, and the shared cache was off at
    every request."""
    if isinstance(spec, str) and spec.startswith("unix:/"):  # pymemcache's spelling, and Django's
        spec = spec[len("unix:"):]
    if isinstance(spec, str) and spec.startswith("/"):
        return spec
    if isinstance(spec, str):
        address = split_address(spec.strip(), MEMCACHED_PORT)
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], int) \
            and not isinstance(spec[1], bool):
        address = host_port(spec[0], str(spec[1]))
    else:
        address = None
    if address is None:
        raise ValueError(f"memcached server {spec!r} is not host:port, a (host, port) pair or a unix socket path")
    return address


def _location(fields: object) -> Location:
    """A :class:`Location` from its stored fields, each checked: nothing unchecked reaches a header."""
    try:
        key, paths, etag, length, complete = fields  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidEntry("a location of another shape") from None
    if not (isinstance(key, str) and isinstance(paths, list) and paths and isinstance(etag, str)
            and _ETAG.fullmatch(etag) and (length is None or type(length) is int and length >= 0)
            and isinstance(complete, bool)):
        raise InvalidEntry("a location with fields of the wrong type")
    fid = _ETAG.fullmatch(etag).group(1)  # type: ignore[union-attr]
    for path in paths:
        replica = _REPLICA_URL.fullmatch(path) if isinstance(path, str) and is_clean_url(path) else None
        if replica is None or fid is not None and int(replica.group(1)) != int(fid):
            raise InvalidEntry(f"a URL that is not a replica of {etag}: {path!r}")
    return Location(key, tuple(paths), etag, length, complete)
