"""The MogileFS client: pymogile's method names over a Python 3 tracker connection pool.

Example::

    client = Client("media", ["10.0.0.1:7001", "10.0.0.2:7001"])
    client.store_content("avatars/42.png", png_bytes, cls="avatar")
    client.get_paths("avatars/42.png")   # ['http://10.0.0.5:7500/dev3/0/000/000/0000000123.fid', ...]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .exceptions import NoneMatchError
from .protocol import Reply, check_key, parse_domains
from .storage import ReplicaResponse, open_replica
from .tracker import Address, TrackerPool
from .upload import NewFile, Uploader


@dataclass(frozen=True)
class FileInfo:
    """What the tracker knows of a key (``file_info``); ``checksum`` only for classes that keep one."""

    key: str
    fid: int
    length: int
    cls: str
    domain: str
    devcount: int
    checksum: str | None = None


class Client:
    """A MogileFS client for one domain.

    :param domain: the MogileFS domain every key belongs to.
    :param trackers: ``"host:port"`` strings (or one whitespace/comma-separated string).
    :param connect_timeout: seconds for a TCP connect to a tracker.
    :param io_timeout: seconds to wait for a tracker's reply.
    :param dead_seconds: how long a tracker that failed is skipped.
    :param storage_timeout: seconds for connects and reads on storage nodes.
    :param pool: a :class:`TrackerPool` to share (then the three tracker options are ignored).
    :param on_change: called with a key after this client wrote, renamed or deleted it (a path
        cache drops the key there).
    """

    def __init__(
        self,
        domain: str,
        trackers: str | Iterable[str | Address] = (),
        *,
        connect_timeout: float = 1.0,
        io_timeout: float = 5.0,
        dead_seconds: float = 5.0,
        storage_timeout: float = 10.0,
        pool: TrackerPool | None = None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        if not domain:
            raise ValueError("a MogileFS domain is required")
        self.domain = domain
        self.pool = pool or TrackerPool(
            trackers, connect_timeout=connect_timeout, io_timeout=io_timeout, dead_seconds=dead_seconds
        )
        self.storage_timeout = storage_timeout
        self.on_change = on_change

    def notify_changed(self, key: str) -> None:
        """Tell ``on_change`` that ``key`` was written, renamed or deleted."""
        if self.on_change is not None:
            self.on_change(key)

    def _ask(self, command: str, **args: str | int | None) -> Reply:
        return self.pool.request(command, {"domain": self.domain, **args})[0]

    def get_paths(self, key: str, noverify: bool = True, zone: str | None = None, pathcount: int = 2) -> list[str]:
        """The URLs of the key's replicas, in the tracker's order (try them in that order)."""
        check_key(key)
        reply = self._ask("get_paths", key=key, noverify=1 if noverify else 0, zone=zone, pathcount=pathcount)
        return [reply[f"path{n}"] for n in range(1, reply.number("paths") + 1)]

    def file_info(self, key: str) -> FileInfo:
        """The key's fid, length, class and replica count."""
        check_key(key)
        reply = self._ask("file_info", key=key)
        return FileInfo(
            key=reply["key"],
            fid=reply.number("fid"),
            length=reply.number("length"),
            cls=reply["class"],
            domain=reply["domain"],
            devcount=reply.number("devcount"),
            checksum=reply.get("checksum"),
        )

    def new_file(self, key: str, cls: str | None = None, *, size: int | None = None) -> NewFile:
        """A writable file for ``key``; the key points at the bytes once it is closed."""
        return _NotifyingNewFile(self, key, cls, size)

    def store_file(self, key: str, fileobj: BinaryIO, cls: str | None = None, *,
                   verify_checksum: bool = False) -> int:
        """Store the rest of ``fileobj`` under ``key``; return the number of bytes stored.

        A seekable ``fileobj`` is sent again to the next storage node if one drops the PUT.
        ``verify_checksum`` asks the tracker to check the stored file's MD5 before committing, for
        classes that keep checksums.
        """
        return Uploader(self, verify_checksums=verify_checksum).upload(key, fileobj, cls)

    def store_content(self, key: str, data: bytes, cls: str | None = None) -> int:
        """Store ``data`` under ``key``; return the number of bytes stored."""
        return Uploader(self, verify_checksums=False).upload(key, data, cls)

    def read_file(self, key: str) -> ReplicaResponse:
        """A streaming, closeable file object over the first replica that answers."""
        return open_replica(self.get_paths(key), timeout=self.storage_timeout)

    def get_file_data(self, key: str) -> bytes:
        """The whole content of ``key`` (for small files; use :meth:`read_file` to stream)."""
        with self.read_file(key) as body:
            return b"".join(body.iter_chunks())

    def delete(self, key: str) -> None:
        """Delete ``key`` (raises :class:`UnknownKeyError` if it does not exist)."""
        check_key(key)
        try:
            self._ask("delete", key=key)
        finally:
            self.notify_changed(key)

    def rename(self, from_key: str, to_key: str) -> None:
        """Rename ``from_key`` to ``to_key`` (raises :class:`KeyExistsError` if that exists)."""
        check_key(from_key)
        check_key(to_key)
        try:
            self._ask("rename", from_key=from_key, to_key=to_key)
        finally:
            self.notify_changed(from_key)
            self.notify_changed(to_key)

    def update_class(self, key: str, cls: str) -> None:
        """Move ``key`` to class ``cls`` (the tracker then adjusts its replica count)."""
        check_key(key)
        self._ask("updateclass", key=key, **{"class": cls})

    def list_keys(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> list[str]:
        """Up to ``limit`` (at most 1000) keys starting with ``prefix``, sorted, after ``after``."""
        return self._list_page(prefix, after, limit)[0]

    def _list_page(self, prefix: str, after: str | None, limit: int | None) -> tuple[list[str], str | None]:
        try:
            reply = self._ask("list_keys", prefix=prefix or None, after=after, limit=limit)
        except NoneMatchError:
            return [], None
        keys = [reply[f"key_{n}"] for n in range(1, reply.number("key_count") + 1)]
        return keys, reply.get("next_after")

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``, page by page."""
        after = None
        while True:
            page, after = self._list_page(prefix, after, None)
            yield from page
            if not page or after is None:
                return

    def close(self) -> None:
        """Close the kept-open tracker connections."""
        self.pool.close()


class _NotifyingNewFile(NewFile):
    """A :class:`NewFile` that tells its client once the key has changed."""

    def __init__(self, client: Client, key: str, cls: str | None, size: int | None) -> None:
        super().__init__(client.pool, client.domain, key, cls, size=size, storage_timeout=client.storage_timeout)
        self._client = client

    def close(self) -> None:
        was_open = not self.closed
        super().close()
        if was_open:
            self._client.notify_changed(self.key)


class Admin:
    """Administrative tracker commands: domains and classes (what ``mogadm`` does)."""

    def __init__(self, trackers: str | Iterable[str | Address] = (), *, pool: TrackerPool | None = None) -> None:
        self.pool = pool or TrackerPool(trackers)

    def create_domain(self, domain: str) -> None:
        """Create ``domain`` (raises :class:`DomainExistsError` if it exists)."""
        self.pool.request("create_domain", {"domain": domain})

    def create_class(self, domain: str, cls: str, mindevcount: int, *, hashtype: str | None = None) -> None:
        """Create class ``cls`` in ``domain`` keeping ``mindevcount`` replicas (``hashtype="MD5"``
        makes the tracker keep checksums)."""
        self.pool.request(
            "create_class", {"domain": domain, "class": cls, "mindevcount": mindevcount, "hashtype": hashtype}
        )

    def get_domains(self) -> dict[str, dict[str, int]]:
        """Every domain with its classes and their ``mindevcount``."""
        domains = parse_domains(self.pool.request("get_domains")[0])
        return {domain: {cls: mindevcount for cls, (mindevcount, _) in classes.items()}
                for domain, classes in domains.items()}
