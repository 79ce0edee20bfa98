"""One :class:`Client` (and its :class:`Uploader`) per process for each domain, set of trackers and
shared path cache.

The wrapped WSGI application and every storage share it, so a file saved through a storage drops
the paths the middleware cached for that key (the middleware is one of the client's change
listeners); with ``MOGILEFS_MEMCACHED_SERVERS`` the client also drops the key from that memcached,
for every process and host that shares it.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from typing import Any

from ...client import Client, gone
from ...forking import new_lock_in_child
from ...tracker import Address, parse_trackers
from ...upload import ChangeListener, Uploader
from . import conf

#: Tracker addresses as ``Client`` takes them: ``"host:port"`` strings or ``(host, port)`` pairs.
Trackers = str | Iterable[str | Address] | None

_lock = threading.Lock()
new_lock_in_child(globals(), "_lock")
_shared: dict[tuple[Any, ...], tuple[Client, Uploader]] = {}
#: The listeners of :func:`listen_to_media_changes`, with the domain and trackers they listen to.
_listening: list[tuple[str, set[Address], ChangeListener]] = []


def _get(domain: str | None, trackers: Trackers) -> tuple[Client, Uploader]:
    # Parsed before use as a key, so "h:7001" and ("h", 7001) share one client.
    key = (domain or conf.domain(), tuple(parse_trackers(trackers)) if trackers else conf.trackers(),
           conf.memcached_servers(), tuple(sorted(conf.client_options().items())))
    with _lock:
        if key not in _shared:
            domain, addresses, servers, options = key
            client = Client(domain, addresses, cache_backend=conf.memcached_backend(servers), **dict(options))
            for listener in _listeners_of(client):
                client.add_change_listener(listener)
            _shared[key] = client, Uploader(client)
        return _shared[key]


def as_dns_compares(trackers: Iterable[Address]) -> set[Address]:
    """Tracker addresses as DNS compares their names (without case or a final dot), and IP
    addresses however written (``0:0:0:0:0:0:0:1`` is ``::1``, ``::ffff:10.0.0.1`` is ``10.0.0.1``)."""
    return {(_compared_host(host), port) for host, port in trackers}


def _compared_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".")
    return str(getattr(address, "ipv4_mapped", None) or address)


def listen_to_media_changes(listener: ChangeListener, besides: Client | None = None) -> None:
    """Tell ``listener`` of every key written, renamed or deleted through a shared client of
    ``MOGILEFS_DOMAIN`` on any of ``MOGILEFS_TRACKERS`` (``besides`` that one), made before or
    after: a storage listing some of those trackers, or all in another order, has a client of its
    own, and links its files under ``MOGILEFS_MEDIA_URL`` all the same."""
    listening = (conf.domain(), as_dns_compares(conf.trackers()), listener)
    with _lock:
        _listening[:] = [*(kept for kept in _listening if not gone(kept[2])), listening]
        clients = [client for client, _ in _shared.values() if client is not besides and _concerns(listening, client)]
    for client in clients:
        client.add_change_listener(listener)


def _listeners_of(client: Client) -> list[ChangeListener]:
    """The listeners of :func:`listen_to_media_changes` that ``client``'s changes concern."""
    return [listening[2] for listening in _listening if _concerns(listening, client)]


def _concerns(listening: tuple[str, set[Address], ChangeListener], client: Client) -> bool:
    domain, trackers, _ = listening
    return client.domain == domain and not trackers.isdisjoint(as_dns_compares(client.pool.addresses))


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
        _listening.clear()
    for client in clients:
        client.close()
