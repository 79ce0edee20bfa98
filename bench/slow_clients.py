"""8d. Slow clients on one uvicorn worker in serve mode: the worker's memory and threads stay small.

``CLIENTS`` clients each ask for a file larger than the kernel's buffers hold, then read it
slowly for ``SLOW_SECONDS``: every unfinished download holds a task, a client connection and a
storage node connection in the worker, and the bytes in flight between them. The worker must
give every client its first 64 KiB while the others wait (no client blocks the rest), keep its
peak RSS within a bound (bodies move in bounded chunks at the client's pace), and use no thread
per client.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from . import servers
from .cluster import Cluster
from .measure import Deadline, Spread
from .report import Figure, Target
from .serving import SERVE_OPTIONS, memory_figure, memory_mib

CLIENTS = 200
SLOW_KEY = "slow.bin"
#: Far more than one download can have in flight in the kernel's buffers in ``SLOW_SECONDS``.
SLOW_SIZE = 64 * 1024 * 1024
FIRST_BYTES = 64 * 1024
#: The time every client together has to get its first bytes.
FIRST_SECONDS = 20.0
#: Each client reads at most ``READ_BYTES`` per round, a round every ``ROUND_SECONDS``.
READ_BYTES = 16 * 1024
ROUND_SECONDS = 0.2
SLOW_SECONDS = 2.0
#: A client's receive buffer, small as a slow link's would be.
RECEIVE_BUFFER = 64 * 1024
#: The peak RSS growth allowed, and the threads.
GROWTH_MIB = 64
THREADS = 8
#: How long the worker may take to close the connections of clients that left.
CLOSE_SECONDS = 10.0


@dataclass(frozen=True)
class Crowd:
    """What one crowd of slow clients saw of the worker."""

    rss_before: float
    rss_peak: float
    threads_before: int
    threads_peak: int
    served: int
    first_seconds: float
    #: The worker's file descriptors after the clients left, over those before they came.
    fds_left: int


def slow_clients(cluster: Cluster, repeat: int) -> list[Figure]:
    """8d: ``CLIENTS`` slow clients at once on one uvicorn worker, ``repeat`` times."""
    cluster.store(SLOW_KEY, SLOW_SIZE)
    with servers.uvicorn(cluster.workdir, "slow", cluster.middleware_env(**SERVE_OPTIONS)) as server:
        [worker] = server.workers()
        _head(server)  # the worker's tracker connection is open before its file descriptors are counted
        crowds = [_crowd(server, worker) for _ in range(repeat)]
    name = f"8d. {CLIENTS} slow clients, uvicorn"
    first = Spread.of([crowd.first_seconds for crowd in crowds])
    left = max(crowd.fds_left for crowd in crowds)
    return [
        memory_figure(f"{name}, worker memory", [(crowd.rss_before, crowd.rss_peak) for crowd in crowds], GROWTH_MIB,
                      note=f"one worker; each client reads {READ_BYTES // 1024} KiB per {ROUND_SECONDS:g} s for "
                           f"{SLOW_SECONDS:g} s after its first {FIRST_BYTES // 1024} KiB"),
        Figure(f"{name}, worker threads", "threads", "threads idle",
               Spread.of([float(crowd.threads_before) for crowd in crowds]),
               Spread.of([float(crowd.threads_peak) for crowd in crowds]),
               Spread.of([crowd.threads_peak / crowd.threads_before for crowd in crowds]),
               Target("threads", "<=", THREADS, worst=True),
               Spread.of([float(crowd.threads_peak) for crowd in crowds])),
        Figure(f"{name}, first {FIRST_BYTES // 1024} KiB", "clients", "clients",
               Spread.of([float(CLIENTS)] * len(crowds)), Spread.of([float(crowd.served) for crowd in crowds]),
               Spread.of([crowd.served / CLIENTS for crowd in crowds]), Target("missed", "==", 0, worst=True),
               Spread.of([float(CLIENTS - crowd.served) for crowd in crowds]),
               note=f"all had them after {first.median:.2f} s [{first.low:.2f}–{first.high:.2f}]; "
                    + ("every storage connection closed after the clients left" if left <= 0 else
                       f"{left} more file descriptors open in the worker {CLOSE_SECONDS:g} s after the clients left")),
    ]


def _crowd(server: servers.Server, worker: int) -> Crowd:
    """One crowd: connect every client, give each its first bytes, read slowly, then leave."""
    Path(f"/proc/{worker}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the RSS
    rss_before, threads_before, fds_before = memory_mib(worker, "VmRSS"), _threads(worker), _fds(worker)
    clients = [_client(server.port) for _ in range(CLIENTS)]
    try:
        started = time.monotonic()
        deadline = Deadline(FIRST_SECONDS, f"{CLIENTS} clients' first bytes")
        served = sum(_first_bytes(client, deadline) for client in clients)
        first_seconds = time.monotonic() - started
        threads_peak = max(threads_before, _threads(worker))
        end = time.monotonic() + SLOW_SECONDS
        while time.monotonic() < end:
            for client in clients:
                _read_some(client)
            threads_peak = max(threads_peak, _threads(worker))
            time.sleep(ROUND_SECONDS)
        rss_peak = memory_mib(worker, "VmHWM")
    finally:
        for client in clients:
            client.close()
    deadline_left = time.monotonic() + CLOSE_SECONDS
    while _fds(worker) > fds_before and time.monotonic() < deadline_left:
        time.sleep(0.05)
    return Crowd(rss_before, rss_peak, threads_before, threads_peak, served, first_seconds,
                 _fds(worker) - fds_before)


def _head(server: servers.Server) -> None:
    """A HEAD of the file, answered 200."""
    connection = http.client.HTTPConnection(servers.HOST, server.port, timeout=FIRST_SECONDS)
    try:
        connection.request("HEAD", f"/mogilefs/{SLOW_KEY}")
        status = connection.getresponse().status
    finally:
        connection.close()
    if status != 200:
        raise RuntimeError(f"HEAD /mogilefs/{SLOW_KEY} answered {status}")


def _client(port: int) -> socket.socket:
    """A client with a small receive buffer that has sent its request."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)  # before connecting, to count
    client.settimeout(FIRST_SECONDS)
    client.connect((servers.HOST, port))
    client.sendall(f"GET /mogilefs/{SLOW_KEY} HTTP/1.1\r\nHost: {servers.HOST}\r\n\r\n".encode("ascii"))
    return client


def _first_bytes(client: socket.socket, deadline: Deadline) -> bool:
    """Whether ``client`` received its first ``FIRST_BYTES`` (head included) in time."""
    received = 0
    try:
        while received < FIRST_BYTES:
            deadline.check()
            chunk = client.recv(FIRST_BYTES - received)
            if not chunk:
                return False
            received += len(chunk)
    except OSError:  # a timeout too, the deadline's included
        return False
    return True


def _read_some(client: socket.socket) -> None:
    """Read what is there, up to ``READ_BYTES``, without waiting."""
    try:
        client.recv(READ_BYTES, socket.MSG_DONTWAIT)
    except OSError:  # nothing there yet (BlockingIOError)
        pass


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
