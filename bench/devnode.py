"""9. The development storage node against a real Perlbal ``web_server`` node, serving the same file.

9a: kept-alive GETs (as Perlbal's reproxy and the middleware's serve mode make them), requests/s
against the Perlbal node. 9b: a burst of clients connecting at once: every one is answered
without waiting for the kernel to retry a dropped connection (1 s and more).
"""

from __future__ import annotations

import selectors
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from mogile_middleware import Client, UnregClassError, UnregDomainError

from . import servers
from .apps import pattern
from .cluster import CLASS, DOMAIN, SMALL_KEY, SMALL_SIZE, Cluster
from .loads import Rate, throughput
from .measure import Spread, interleaved, ratios
from .report import Figure, Target

KEPT_ALIVE_CONNECTIONS = 4
KEPT_ALIVE_SECONDS = 3.0
BURST_CLIENTS = 64
#: A connection the kernel dropped from a full backlog is retried after 1 s at the earliest.
BURST_MS = 500
BURST_LIMIT_SECONDS = 20.0


@contextmanager
def development_node(cluster: Cluster) -> Iterator[str]:
    """The development MogileFS (one storage node) in a child process, holding the small file;
    yields that file's URL on its node."""
    tracker, node = servers.free_port(), servers.free_port()
    argv = [sys.executable, "-m", "mogile_middleware", "devserver", "--host", servers.HOST, "--port", str(tracker),
            "--storage-ports", str(node), "--data", str(cluster.workdir / "devmogile"), "--domain", DOMAIN,
            "--class", f"{CLASS}=1"]
    with servers.child(argv, [tracker, node], cluster.workdir / "devmogile.log"):
        client = Client(DOMAIN, [f"{servers.HOST}:{tracker}"])
        try:
            # The tracker listens before it has created the domain and class (as a user would, through it).
            deadline = time.monotonic() + servers.START_SECONDS
            while True:
                try:
                    client.store_content(SMALL_KEY, pattern(SMALL_SIZE), cls=CLASS)
                    break
                except (UnregDomainError, UnregClassError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield client.get_paths(SMALL_KEY)[0]
        finally:
            client.close()


def burst(url: str) -> float:
    """Milliseconds until ``BURST_CLIENTS`` clients, all connecting at once, have each read the
    whole answer to a GET of ``url`` (HTTP/1.0: the node closes after it); clients still waiting
    after ``BURST_LIMIT_SECONDS`` are given up, and the burst counts as that long."""
    parts = urlsplit(url)
    request = f"GET {parts.path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode()
    with selectors.DefaultSelector() as selector:
        start = time.perf_counter()
        for _ in range(BURST_CLIENTS):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex((parts.hostname or "", parts.port or 80))
            selector.register(client, selectors.EVENT_WRITE)
        received = 0
        while selector.get_map() and time.perf_counter() - start < BURST_LIMIT_SECONDS:
            for key, events in selector.select(timeout=0.1):
                client = key.fileobj
                assert isinstance(client, socket.socket)
                if events & selectors.EVENT_WRITE:
                    client.send(request)
                    selector.modify(client, selectors.EVENT_READ)
                elif chunk := client.recv(65536):
                    received += len(chunk)
                else:
                    selector.unregister(client)
                    client.close()
        elapsed = time.perf_counter() - start
        waiting = [key.fileobj for key in selector.get_map().values()]
    for client in waiting:
        client.close()  # type: ignore[union-attr]
    if waiting:
        return BURST_LIMIT_SECONDS * 1000
    if received < BURST_CLIENTS * SMALL_SIZE:
        raise RuntimeError(f"{url}: {received} bytes for {BURST_CLIENTS} clients")
    return elapsed * 1000


def devnode(cluster: Cluster, repeat: int) -> list[Figure]:
    """9a and 9b, the development node against the Perlbal node of the cluster."""
    perlbal_url = cluster.replica(SMALL_KEY)
    with development_node(cluster) as development_url:
        rates = {name: Rate(url, cluster.workdir, connections=KEPT_ALIVE_CONNECTIONS, seconds=KEPT_ALIVE_SECONDS)
                 for name, url in (("perlbal", perlbal_url), ("development", development_url))}
        speeds = interleaved(repeat, rates)
        bursts = interleaved(repeat, {"perlbal": lambda: burst(perlbal_url), "development": lambda: burst(development_url)})
    kept_alive = throughput("9a. development node, kept-alive GETs", "Perlbal web_server node", speeds,
                            "development", "perlbal", 0.5,
                            note=f"{KEPT_ALIVE_CONNECTIONS} keep-alive connections, a 10 KiB file")
    last = Spread.of(bursts["development"])
    burst_figure = Figure(f"9b. development node, {BURST_CLIENTS} clients at once", "ms to the last answer",
                          "Perlbal web_server node", Spread.of(bursts["perlbal"]), last,
                          Spread.of(ratios(bursts["development"], bursts["perlbal"])),
                          Target("last", "<", BURST_MS, " ms", worst=True), last,
                          "every client connects, then sends its GET, in one go")
    return [kept_alive, burst_figure]
