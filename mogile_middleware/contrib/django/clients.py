"""One :class:`Client` (and its :class:`Uploader`) per process for each domain, set of trackers and
shared path cache.

The wrapped WSGI application and every storage share it, so a file saved through a storage drops
the paths the middleware cached for that key (the middleware is one of the client's change
listeners); with ``MOGILEFS_MEMCACHED_SERVERS`` the client also drops the key from that memcached,
for every process and host that shares it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from ...client import Client
from ...forking import new_lock_in_child
from ...tracker import Address, parse_trackers
from ...upload import Uploader
from . import conf

#: Tracker addresses as ``Client`` takes them: ``"host:port"`` strings or ``(host, port)`` pairs.
Trackers = str | Iterable[str | Address] | None

_lock = threading.Lock()
new_lock_in_child(globals(), "_lock")
_shared: dict[tuple[Any, ...], tuple[Client, Uploader]] = {}


def _get(domain: str | None, trackers: Trackers) -> tuple[Client, Uploader]:
    # Parsed before use as a key, so "h:7001" and ("h", 7001) share one client.
    key = (domain or conf.domain(), tuple(parse_trackers(trackers)) if trackers else conf.trackers(),
           conf.memcached_servers(), tuple(sorted(conf.client_options().items())))
    with _lock:
        if key not in _shared:
            domain, addresses, servers, options = key
            client = Client(domain, addresses, cache_backend=conf.memcached_backend(servers), **dict(options))
            _shared[key] = client, Uploader(client)
        return _shared[key]


def get_client(domain: str | None = None, trackers: Trackers = None) -> Client:
    """The shared client of ``domain`` and ``trackers`` (``MOGILEFS_DOMAIN`` and
    ``MOGILEFS_TRACKERS`` when not given)."""
    return _get(domain, trackers)[0]


def get_uploader(domain: str | None = None, trackers: Trackers = None) -> Uploader:
    """The uploader of :func:`get_client`'s client (it remembers which classes keep checksums)."""
    return _get(domain, trackers)[1]


def close_clients() -> None:
    """Close and forget every shared client, e.g. between tests that start their own trackers."""
    with _lock:
        clients = [client for client, _ in _shared.values()]
        _shared.clear()
    for client in clients:
        client.close()
