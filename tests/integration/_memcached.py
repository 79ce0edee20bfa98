"""Run Debian's memcached as a subprocess on a free loopback port, for the shared path cache tests."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
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
