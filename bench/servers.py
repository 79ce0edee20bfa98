"""The servers under test, each a child process on 127.0.0.1 that is stopped by its PID on exit.

Storage nodes are Perlbal ``web_server`` services, as mogstored is; the tracker is the
development tracker (:mod:`bench.tracker`) with those nodes as its devices; applications run
under gunicorn or uvicorn (:mod:`bench.apps`); the front proxy is a Perlbal reverse proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
START_SECONDS = 20.0
STOP_SECONDS = 10.0
#: gunicorn workers (sync): one per core of the 2-core reference machine.
WORKERS = 2
#: The checkout, so that child processes import this ``bench`` package.
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def child(argv: Sequence[str], ports: Sequence[int], log: Path,
          env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the duration of the block, ready once every one of ``ports`` accepts."""
    with open(log, "wb") as stderr:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + START_SECONDS
        for port in ports:
            while not _accepts(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.05)
        yield process
    finally:
        _stop(process)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _cpu_seconds(pid: int) -> float:
    # utime and stime are fields 14 and 15 of /proc/PID/stat, counted after the ")" ending the name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _perlbal(workdir: Path, name: str, services: Mapping[str, Sequence[str]], pools: Mapping[str, int],
             ports: Sequence[int]) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """One Perlbal process running ``services`` (name → ``SET`` lines), with one-server ``pools``."""
    lines = [line for pool, port in pools.items()
             for line in (f"CREATE POOL {pool}", f"  POOL {pool} ADD {HOST}:{port}")]
    for service, settings in services.items():
        lines += [f"CREATE SERVICE {service}", *(f"  SET {setting}" for setting in settings), f"ENABLE {service}"]
    config = workdir / f"{name}.conf"
    config.write_text("\n".join(lines) + "\n")
    return child(["perlbal", f"--config={config}"], ports, workdir / f"{name}.log")


@contextmanager
def storage_node(workdir: Path, devid: int) -> Iterator[Server]:
    """A storage node holding device ``devN`` (GET, HEAD, PUT, DELETE, as mogstored), one process."""
    port = free_port()
    docroot = workdir / f"stor{devid}"
    (docroot / f"dev{devid}").mkdir(parents=True)
    settings = ["role = web_server", f"listen = {HOST}:{port}", f"docroot = {docroot}", "dirindexing = 0",
                "enable_put = 1", "enable_delete = 1", "min_put_directory = 1", "persist_client = 1"]
    with _perlbal(workdir, f"stor{devid}", {f"stor{devid}": settings}, {}, [port]) as process:
        yield Server(port, process.pid, master=False)


@contextmanager
def tracker(workdir: Path, domain: str, classes: Mapping[str, int], nodes: Sequence[int]) -> Iterator[str]:
    """The development tracker with the storage nodes at ``nodes`` as devices 1, 2...; yields ``host:port``."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.tracker", "--data", str(workdir / "tracker"), "--port", str(port),
            "--domain", domain]
    argv += [arg for name, count in classes.items() for arg in ("--class", f"{name}={count}")]
    argv += [arg for node in nodes for arg in ("--node", str(node))]
    with child(argv, [port], workdir / "tracker.log"):
        yield f"{HOST}:{port}"


@dataclass(frozen=True)
class Server:
    """A running application server: where it listens, and its PID, that of a master whose
    children are the workers, or (``master=False``) of the only process, which serves."""

    port: int
    pid: int
    master: bool = True

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def workers(self) -> list[int]:
        """The PIDs of the worker processes."""
        if not self.master:
            return [self.pid]
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the workers have used."""
        return sum(_cpu_seconds(pid) for pid in self.workers())


@contextmanager
def _app_server(argv: Sequence[str], port: int, log: Path, app_env: Mapping[str, str], workers: int,
                master: bool) -> Iterator[Server]:
    """Run an application server (``argv``) on ``port``, ready once it accepts and has ``workers``."""
    with child(argv, [port], log, {**os.environ, **app_env}) as process:
        server = Server(port, process.pid, master)
        deadline = time.monotonic() + START_SECONDS
        while len(server.workers()) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log.stem} started {len(server.workers())} of {workers} workers")
            time.sleep(0.05)
        yield server


def gunicorn(workdir: Path, name: str, app_env: Mapping[str, str], port: int | None = None, *,
             workers: int = WORKERS, app: str = "bench.apps:make_app()") -> AbstractContextManager[Server]:
    """``app`` (:func:`bench.apps.make_app` by default) under gunicorn with ``workers`` sync
    workers, configured by ``app_env``, on ``port`` (a free one by default)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "sync",
            "--bind", f"{HOST}:{port}", "--backlog", "2048", "--timeout", "120", app]
    return _app_server(argv, port, workdir / f"gunicorn-{name}.log", app_env, workers, master=True)


def uvicorn(workdir: Path, name: str, app_env: Mapping[str, str], workers: int = 1) -> AbstractContextManager[Server]:
    """:func:`bench.apps.make_asgi_app` under uvicorn, configured by ``app_env``, on a free port.

    One worker is the serving process itself; more are the children of a supervisor. uvicorn
    picks its defaults: the asyncio loop and h11, unless uvloop and httptools are installed.
    """
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.apps:make_asgi_app", "--host", HOST,
            "--port", str(port), "--workers", str(workers), "--backlog", "2048", "--lifespan", "off",
            "--no-access-log"]
    return _app_server(argv, port, workdir / f"uvicorn-{name}.log", app_env, workers, master=workers > 1)


@contextmanager
def relay(workdir: Path, url: str) -> Iterator[int]:
    """:mod:`bench.relay` passing on the response to ``url``; yields its port."""
    port = free_port()
    with child([sys.executable, "-m", "bench.relay", str(port), url], [port], workdir / "relay.log"):
        yield port


#: The front proxy's settings, the same for every service. Backend connections are kept open
#: where the backend allows it (the storage node; gunicorn's sync workers close every one), as
#: Perlbal keeps its reproxy connections to storage nodes open.
FRONT_SETTINGS = ("role = reverse_proxy", "enable_reproxy = true", "reproxy_cache_maxsize = 1000",
                  "persist_client = on", "persist_backend = on", "verify_backend = off")


@contextmanager
def front_proxy(workdir: Path, backends: Mapping[str, int]) -> Iterator[dict[str, int]]:
    """A Perlbal reverse proxy with one service per backend (name → port); yields name → its port."""
    ports = {name: free_port() for name in backends}
    services = {name: [*FRONT_SETTINGS, f"listen = {HOST}:{ports[name]}", f"pool = {name}_pool"]
                for name in backends}
    pools = {f"{name}_pool": port for name, port in backends.items()}
    with _perlbal(workdir, "front", services, pools, list(ports.values())):
        yield ports
