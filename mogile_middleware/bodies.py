"""The body cache: small files' bytes kept in memory, so serve mode answers them without a
storage node round trip.

MogileFS never changes a stored fid's bytes (an overwrite makes a new fid), so a body kept under
its fid is never stale: which version a key names is the path cache's business alone. Only
versions named by their fid (``fid-N`` ETags) are kept; the total is bounded in bytes, and when it
is full the bodies stored longest ago go first.
"""

from __future__ import annotations

import threading

from . import metrics
from .forking import renew_in_child

#: What a kept body costs besides its bytes (its entry, its ETag, the bytes object's header),
#: counted with them: 500,000 empty files cost 45 MiB, and counted as nothing, were all kept;
#: on 64-bit CPython 3.11 bodies of 1 to 10 bytes cost up to 178 more each (tracemalloc, the
#: dict's slots included, which double as it grows), where 100 were counted: a cache of tiny
#: files held 1.4 times its size.
ENTRY_BYTES = 192


class BodyCache:
    """Bodies of at most ``max_file_bytes`` bytes by ETag, ``max_bytes`` in all (per process, each
    counted with :data:`ENTRY_BYTES` more)."""

    def __init__(self, max_bytes: int, max_file_bytes: int = 256 * 1024) -> None:
        if max_bytes < 0 or max_file_bytes < 0:
            raise ValueError(f"body cache sizes must be >= 0, not {max_bytes} and {max_file_bytes}")
        self.max_bytes = max_bytes
        self.max_file_bytes = min(max_file_bytes, max_bytes - ENTRY_BYTES)
        self.size = 0
        self._bodies: dict[str, bytes] = {}
        self._filling: set[str] = set()
        self._lock = threading.Lock()  # for puts and claims only: a get is one dict lookup
        renew_in_child(self)

    def keeps(self, etag: str, length: int) -> bool:
        """True if a file of ``length`` bytes and this ``etag`` is kept here once read."""
        return length <= self.max_file_bytes and etag.startswith("fid-")

    def get(self, etag: str) -> bytes | None:
        """The body of this version, if kept."""
        body = self._bodies.get(etag)
        metrics.recorder.body_cache(body is not None)
        return body

    def claim(self, etag: str) -> bool:
        """True for the one request that reads this version whole to keep it, until it releases
        it (:meth:`release`); the others meanwhile stream it: 300 requests at once for a new file
        read it 300 times whole, into memory that ``max_bytes`` does not bound."""
        with self._lock:
            if etag in self._filling:
                return False
            self._filling.add(etag)
            return True

    def release(self, etag: str) -> None:
        """End the :meth:`claim` of this version, kept or not."""
        with self._lock:
            self._filling.discard(etag)

    def put(self, etag: str, body: bytes) -> None:
        """Keep ``body`` as this version's, dropping the oldest bodies to stay within ``max_bytes``."""
        with self._lock:
            if etag in self._bodies:
                return
            self._bodies[etag] = body
            self.size += len(body) + ENTRY_BYTES
            if self.size > self.max_bytes:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Drop the oldest bodies until the total is within ``max_bytes``, in one pass: a dict has
        no cheap "first item" once its head has been deleted, so asking for it per body dropped
        took a time growing with the square of their number (1.1 s of an event loop to make room
        for a 4 MiB file among small ones)."""
        dropped = []
        for old, body in self._bodies.items():
            if self.size <= self.max_bytes:
                break
            self.size -= len(body) + ENTRY_BYTES
            dropped.append(old)
        for old in dropped:
            del self._bodies[old]

    def renew_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._filling = set()  # the claims of the parent's threads, which the child never ends
