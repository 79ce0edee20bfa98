"""A memcached :class:`~mogile_middleware.cache.CacheBackend`: one path cache for every process and host.

Needs the ``memcached`` extra (pymemcache). Values are pickled: whoever can write to this memcached
can run code in the application, so it must be reachable by the application hosts only.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

from pymemcache.client.base import check_key_helper, normalize_server_spec
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheIllegalInputError
from pymemcache.serde import pickle_serde

#: Seconds a server that failed is skipped, so a dead memcached costs one connect attempt per thread
#: this often rather than one per request.
DEAD_SECONDS = 5.0

#: memcached reads a larger expiry as a Unix timestamp, so longer keeps are cut to this (30 days).
MAX_EXPIRE_SECONDS = 30 * 24 * 3600


class MemcachedBackend:
    """Path cache entries in memcached, shared by gunicorn workers and application hosts.

    ``servers`` are ``host:port`` strings (a list, or one string separated by commas or spaces).
    Errors reach :class:`~mogile_middleware.cache.PathCache`, which treats them as misses; a failed
    server is skipped for :data:`DEAD_SECONDS`. A ready pymemcache ``client`` is used as given, and
    must then be safe to share between the threads (and forks) of the application.
    """

    def __init__(self, servers: str | Sequence[str] = "127.0.0.1:11211", *, prefix: str = "mogile:",
                 connect_timeout: float = 0.2, timeout: float = 0.5, client: Any = None) -> None:
        items = servers.replace(",", " ").split() if isinstance(servers, str) else list(servers)
        if client is None and not items:
            raise ValueError("no memcached server given")
        self.servers = [normalize_server_spec(item) for item in items]
        self.prefix = prefix
        try:  # a bad prefix would otherwise turn every request into a logged miss
            check_key_helper(self._memcached_key(""), allow_unicode_keys=False)
        except MemcacheIllegalInputError as error:
            raise ValueError(f"prefix {prefix!r} cannot start a memcached key: {error}") from error
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._given = client
        self._pid = os.getpid()
        self._local = threading.local()

    def get(self, key: str) -> tuple[Any, float] | None:
        """``(value, stored_at)`` for ``key``, or None if memcached does not hold it."""
        return self._client().get(self._memcached_key(key))

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        """Keep ``value`` for ``keep_seconds`` (rounded up to whole seconds, as memcached counts)."""
        if keep_seconds <= 0:
            return  # memcached would read an expiry of 0 as "keep forever"
        expire = min(math.ceil(keep_seconds), MAX_EXPIRE_SECONDS)
        # noreply=False: wait for memcached's answer, so a failed store raises instead of vanishing.
        self._client().set(self._memcached_key(key), (value, stored_at), expire=expire, noreply=False)

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        self._client().delete(self._memcached_key(key), noreply=False)

    def _memcached_key(self, key: str) -> str:
        # memcached keys are at most 250 bytes of ASCII without blanks or control characters, while
        # MogileFS keys can be longer and hold any of them: a digest fits every key.
        return self.prefix + hashlib.sha1(key.encode("utf-8")).hexdigest()

    def _client(self) -> Any:
        if self._given is not None:
            return self._given
        if os.getpid() != self._pid:
            # A forked child shares its parent's sockets: start afresh, never touch the inherited ones.
            self._pid = os.getpid()
            self._local = threading.local()
        client = getattr(self._local, "client", None)
        if client is None:
            # One client per thread, because HashClient's bookkeeping of failed servers is not
            # thread-safe. retry_attempts=0 marks a failing server dead at once, for DEAD_SECONDS.
            client = self._local.client = HashClient(
                self.servers, serde=pickle_serde, connect_timeout=self.connect_timeout, timeout=self.timeout,
                no_delay=True, retry_attempts=0, dead_timeout=DEAD_SECONDS,
            )
        return client
