"""Run Debian's memcached as a subprocess on a free loopback port, for the shared path cache tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from conftest import require_program
from integration._gunicorn import port_accepts, stop_process
from integration._wire_client import free_port

#: Seconds for memcached to accept connections.
START_SECONDS = 10.0


@dataclass
class MemcachedServer:
    """A running memcached: its ``address`` (``127.0.0.1:port``) and ``stop()`` to take it down early."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        """``host:port``, as MemcachedBackend takes it."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop memcached by its PID (no error if it has already stopped)."""
        stop_process(self.process)


@contextmanager
def start_memcached() -> Iterator[MemcachedServer]:
    """A memcached with 16 MiB, TCP on loopback only (no UDP); stopped on exit."""
    program = require_program("memcached", "memcached")
    port = free_port()
    # memcached refuses to run as root unless told which user to be.
    user = ["-u", "root"] if os.geteuid() == 0 else []
    process = subprocess.Popen([program, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "16", *user],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = MemcachedServer(port, process)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not port_accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"memcached did not start on port {port} (exit status {process.poll()})")
            time.sleep(0.02)
        yield server
    finally:
        server.stop()


@contextmanager
def writes_delayed(server: MemcachedServer, seconds: float, commands: tuple[bytes, ...] = (b"set ",)) -> Iterator[str]:
    """A relay to ``server`` that holds every ``set`` command (every one of ``commands``) ``seconds``
    before passing it on, as a memcached on a host that stalls; reads pass at once. Yields its
    address (``host:port``)."""
    listener = socket.create_server(("127.0.0.1", 0))
    sockets: list[socket.socket] = [listener]
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def start(target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with lock:
            threads.append(thread)
        thread.start()

    def pump(source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        try:
            while data := source.recv(65536):
                if delayed and data.startswith(commands):
                    time.sleep(seconds)
                sink.sendall(data)
        except OSError:
            pass  # the relay closed, or the other side went away
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        try:
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", server.port))
                with lock:
                    sockets.extend((client, upstream))
                start(pump, client, upstream, True)
                start(pump, upstream, client, False)
        except OSError:
            pass  # the listener closed

    start(accept)
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        with lock:
            opened = list(sockets)
        for sock in opened:  # a shutdown wakes the threads blocked on them, which closing would not
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with lock:
            started = list(threads)
        for thread in started:
            thread.join(5)
        for sock in opened:
            sock.close()
