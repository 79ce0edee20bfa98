"""``DevMogileFS``: a tracker and storage nodes on local ports, started and stopped together.

For development and tests only. Layout of the data directory: ``tracker/mogilefs.sqlite3`` (the
metadata) and ``stor<N>/dev<N>/...`` (the docroot of storage node N, holding device N). Reusing a
data directory keeps domains, classes, hosts, devices, settings, keys and files. Hosts and
devices can also be added with the admin commands (``mogadm host add``, ``mogadm device add``):
a device on one of these nodes is a ``dev<devid>`` directory in its docroot, as with mogstored.
Storage nodes running elsewhere (a real Perlbal ``web_server``, as mogstored runs it) join as more
devices with :meth:`DevMogileFS.add_storage_node`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from ..exceptions import TrackerError
from ..protocol import encode_request, parse_reply
from .metadata import MetadataStore
from .netutil import BackgroundServer
from .storage_node import StorageNode
from .tracker_server import TrackerServer, check_delays


class DevMogileFS:
    """A development MogileFS: one tracker and ``storage_nodes`` nodes (one device each) on ``host``.

    For development and tests only; not a replacement for MogileFS. Port 0 means a free port;
    ``storage_ports`` overrides ``storage_nodes``. ``data_dir=None`` uses a temporary directory,
    removed on :meth:`stop`. ``domains`` maps domain names to ``{class: mindevcount}``; they are
    created (or their classes updated) through the tracker protocol on start, as a user would.
    ``storage_nodes=0`` with :meth:`add_storage_node` keeps every file on external nodes.

    ``replication_delay`` 0 replicates and deletes synchronously: a new file has all its copies
    when ``create_close`` answers, and dropped data is gone when ``delete`` answers. Above 0 it
    works as mogilefsd does: a new file (or one moved to a class with more copies) gets its
    other copies, and the files of a deleted or overwritten fid are deleted from the nodes, that
    many seconds later; the metadata changes at once. Work not yet due when :meth:`stop` is
    called is dropped (see :class:`~.replication.BackgroundWork`). ``overwrite_gap`` seconds (0 by
    default) leave an overwritten key unknown between its old file and its new one, as mogilefsd
    does for a moment.

    ``tracker_idle_timeout`` (none), ``tracker_line_timeout`` (10 s) and ``tracker_max_connections``
    (200) are the tracker's ``idle_timeout``, ``line_timeout`` and ``max_connections``
    (see :class:`~.tracker_server.TrackerServer`).
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        tracker_port: int = 0,
        storage_ports: Sequence[int] | None = None,
        storage_nodes: int = 2,
        domains: Mapping[str, Mapping[str, int]] | None = None,
        replication_delay: float = 0.0,
        overwrite_gap: float = 0.0,
        tracker_idle_timeout: float | None = None,
        tracker_line_timeout: float = 10.0,
        tracker_max_connections: int = 200,
    ) -> None:
        check_delays(replication_delay, overwrite_gap)
        if not isinstance(host, str) or ":" in host:  # its URLs and trackers write host:port
            raise ValueError(f"host must be an IPv4 address or a host name, not {host!r}: the development "
                             "MogileFS listens on IPv4 only")
        self.host = host
        self.replication_delay = replication_delay
        self.overwrite_gap = overwrite_gap
        self.tracker_idle_timeout = tracker_idle_timeout
        self.tracker_line_timeout = tracker_line_timeout
        self.tracker_max_connections = tracker_max_connections
        self._requested_data_dir = Path(data_dir) if data_dir is not None else None
        self._storage_ports = list(storage_ports) if storage_ports is not None else [0] * storage_nodes
        self._domains = {domain: dict(classes) for domain, classes in (domains or {}).items()}
        self.data_dir: Path | None = None
        self.store: MetadataStore | None = None
        self.tracker: TrackerServer | None = None
        self.nodes: list[StorageNode] = []
        self._tracker_port = tracker_port
        self._lock: int | None = None  # the descriptor holding the data directory's lock

    # -- addresses ----------------------------------------------------------------------------

    @property
    def tracker_address(self) -> tuple[str, int]:
        """``(host, port)`` of the tracker."""
        return self._running_tracker().address

    @property
    def trackers(self) -> list[str]:
        """The tracker as a client wants it: ``["127.0.0.1:7001"]``."""
        host, port = self.tracker_address
        return [f"{host}:{port}"]

    def _running_tracker(self) -> TrackerServer:
        if self.tracker is None:
            raise RuntimeError("DevMogileFS is not started")
        return self.tracker

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> DevMogileFS:
        """Start the storage nodes and the tracker, then create the configured domains and classes."""
        if self.tracker is not None:
            return self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        data_dir = self._requested_data_dir or Path(tempfile.mkdtemp(prefix="mogile-dev-"))
        self.data_dir = data_dir
        if data_dir.exists() and not data_dir.is_dir():  # mkdir's "File exists" would not say what is wrong
            raise NotADirectoryError(errno.ENOTDIR, "the data directory is a file", str(data_dir))
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _locked(data_dir)
        self.store = MetadataStore(data_dir / "tracker" / "mogilefs.sqlite3")
        # Paths name a node by its address, as mogilefsd names a host by its ``--ip``: a proxy
        # fetching a name needs a resolver of its own (nginx's ``proxy_pass $variable`` has none).
        node_address = socket.gethostbyname(self.host)
        for number, port in enumerate(self._storage_ports, 1):
            node = StorageNode(data_dir / f"stor{number}", self.host, port)
            (node.docroot / f"dev{number}").mkdir(parents=True, exist_ok=True)  # a device is a directory
            self.nodes.append(node)
            node.start()
            self.store.register_device(number, f"stor{number}", node_address, node.port)
        self.tracker = TrackerServer(
            self.store,
            self.host,
            self._tracker_port,
            replication_delay=self.replication_delay,
            overwrite_gap=self.overwrite_gap,
            idle_timeout=self.tracker_idle_timeout,
            line_timeout=self.tracker_line_timeout,
            max_connections=self.tracker_max_connections,
        )
        self._configure(self.tracker)
        self.tracker.start()

    def stop(self) -> None:
        """Stop everything (all servers at once; delayed work not yet due is dropped).

        A temporary data directory is removed.
        """
        servers: list[BackgroundServer] = [*self.nodes, *([self.tracker] if self.tracker else [])]
        stoppers = [threading.Thread(target=server.stop) for server in servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        self.tracker, self.nodes = None, []
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._requested_data_dir is None and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def add_storage_node(self, host: str, port: int) -> int:
        """Register a running storage node at ``http://host:port`` as one more device; returns its devid.

        The tracker reaches storage only over HTTP (GET, HEAD, PUT creating directories, DELETE), so
        any node answering as mogstored does will do. It must hold ``dev<devid>/`` in its docroot,
        and the caller starts and stops it.
        """
        if self.store is None:
            raise RuntimeError("DevMogileFS is not started")
        devid = max((device.devid for device in self.store.devices()), default=0) + 1
        self.store.register_device(devid, f"stor{devid}", host, port)
        return devid

    def stop_tracker(self) -> None:
        """Stop only the tracker (its clients' connections are cut); the nodes keep serving."""
        self._running_tracker().stop()

    def start_tracker(self) -> None:
        """Start the tracker again, on the same port."""
        self._running_tracker().start()

    def __enter__(self) -> DevMogileFS:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- configuration by tracker commands ----------------------------------------------------

    def _configure(self, tracker: TrackerServer) -> None:
        """Create the configured domains and classes with tracker commands (existing ones are kept),
        answered before the tracker listens: no client ever finds it without them."""

        def ask(command: str, args: dict[str, str | int], tolerated: str) -> bool:
            try:
                parse_reply(tracker.answer(encode_request(command, args).rstrip(b"\r\n")))
            except TrackerError as exc:
                if exc.code != tolerated:
                    raise
                return False
            return True

        for domain, classes in self._domains.items():
            ask("create_domain", {"domain": domain}, "domain_exists")
            for name, mindevcount in classes.items():
                args: dict[str, str | int] = {"domain": domain, "class": name, "mindevcount": mindevcount}
                if not ask("create_class", args, "class_exists"):
                    ask("update_class", args, "")


def _locked(data_dir: Path) -> int:
    """A descriptor holding the lock of ``data_dir`` for this process (released when it is closed,
    or the process ends). Another development MogileFS on the same directory registered its own
    nodes' ports there, and the first one's tracker sent every client to them."""
    descriptor = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OSError(errno.EBUSY, "in use by another development MogileFS", str(data_dir)) from None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor
