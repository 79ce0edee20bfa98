"""Run gunicorn (or uvicorn, or daphne) as a subprocess over a test application, on a free loopback port.

Shared by the tests that need a real pre-fork server (and the front proxies placed before it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from integration._wire_client import free_port

HERE = Path(__file__).parent
REPO = HERE.parent.parent
#: Seconds for gunicorn to listen and boot its workers, and again to stop.
START_SECONDS = 15.0
STOP_SECONDS = 15.0


@dataclass(frozen=True)
class GunicornServer:
    """A running gunicorn: its loopback ``port`` and master ``pid``."""

    port: int
    pid: int

    def worker_pids(self) -> list[int]:
        """The PIDs of the master's current children (its workers)."""
        try:
            return [int(pid) for pid in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except FileNotFoundError:  # the master has gone
            return []


@contextmanager
def run_gunicorn(env: dict[str, str], *, workers: int = 1, app: str | None = "_gunicorn_app:make_app()",
                 extra_args: Sequence[str] = (), port: int | None = None) -> Iterator[GunicornServer]:
    """Start gunicorn with ``env`` added to this environment; yield it once its workers are up.

    ``app`` is imported from the repository root or this directory (``None``: ``extra_args`` name
    it, e.g. with ``--paste``); gunicorn listens on ``port``
    (a free one by default) and is stopped on exit.
    """
    port = port or free_port()
    environment = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    # A file, not a pipe: a pipe nobody reads would block gunicorn once its log fills the buffer.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
             "--timeout", "60", *extra_args, *([app] if app else [])],
            env=environment, stdout=subprocess.DEVNULL, stderr=log,
        )
        try:
            server = GunicornServer(port, process.pid)
            _wait_until_ready(server, workers, process, log)
            yield server
        finally:
            stop_process(process)


@contextmanager
def run_uvicorn(env: dict[str, str], *, app: str = "_gunicorn_app:make_asgi_app",
                extra_args: Sequence[str] = (), port: int | None = None) -> Iterator[GunicornServer]:
    """Start uvicorn (one process, the ASGI middleware from ``app``, a factory) with ``env``; yield
    it once it accepts connections on ``port`` (a free one by default); stopped on exit. It runs
    with ``--no-proxy-headers``, as the README says: ``trusted_proxies`` must see the proxy's address."""
    port = port or free_port()
    with _run_asgi_server("uvicorn", env, port, [
            "--factory", app, "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on", "--no-access-log",
            "--no-proxy-headers", *extra_args]) as server:
        yield server


@contextmanager
def run_daphne(env: dict[str, str]) -> Iterator[GunicornServer]:
    """Start daphne, Django's ASGI server, over the ASGI test application with ``env``, as :func:`run_uvicorn`."""
    port = free_port()
    with _run_asgi_server("daphne", env, port, [
            "--bind", "127.0.0.1", "--port", str(port), "--verbosity", "0", "_daphne_app:application"]) as server:
        yield server


@contextmanager
def _run_asgi_server(name: str, env: dict[str, str], port: int, args: list[str]) -> Iterator[GunicornServer]:
    environment = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, "-m", name, *args], env=environment,
                                   stdout=subprocess.DEVNULL, stderr=log)
        try:
            server = GunicornServer(port, process.pid)
            deadline = time.monotonic() + START_SECONDS
            while not port_accepts(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"{name} did not start: {log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.05)
            yield server
        finally:
            stop_process(process)


def _wait_until_ready(server: GunicornServer, workers: int, process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    # The master listens before it forks: wait for the workers too, so tests can count them.
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if port_accepts(server.port) and len(server.worker_pids()) >= workers:
            return
        time.sleep(0.05)
    log.seek(0)
    raise AssertionError(f"gunicorn did not start: {log.read().decode(errors='replace')[-2000:]}")


def port_accepts(port: int) -> bool:
    """True if something accepts connections on the loopback ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` by its PID: SIGTERM (a graceful shutdown), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(5)
