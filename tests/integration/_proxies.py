"""Run Debian's Perlbal and nginx on free loopback ports: front proxies and Perlbal storage nodes.

Each server gets its configuration written to a temporary directory, counts as ready once its
ports accept connections, and is stopped by its PID when the ``with`` block ends.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import require_program
from integration._gunicorn import port_accepts, stop_process
from integration._wire_client import free_port

#: The configurations shipped to users; the tests run them with only their ports changed.
SHIPPED_NGINX_CONF = Path(__file__).parents[2] / "examples" / "nginx.conf"
SHIPPED_PERLBAL_CONF = SHIPPED_NGINX_CONF.with_name("perlbal.conf")
#: Seconds for a server to accept connections.
START_SECONDS = 10.0


@dataclass(frozen=True)
class Proxy:
    """A running front proxy: its loopback ``port`` and ``pid``."""

    port: int
    pid: int


@dataclass(frozen=True)
class StorageProxy:
    """A Perlbal ``web_server`` serving a MogileFS docroot: ``port``, ``pid`` and its base ``url``."""

    port: int
    pid: int
    url: str


@contextmanager
def run_perlbal_front(backend_port: int) -> Iterator[Proxy]:
    """Perlbal with the shipped ``examples/perlbal.conf``, its three ports replaced by free ones:
    the configuration observed to work (``tests/data/mogile-wire/perlbal-reproxy.txt``), with a
    reproxy cache, so that ``X-REPROXY-CACHE-FOR`` is honoured."""
    port, management_port = free_port(), free_port()
    config = _shipped(SHIPPED_PERLBAL_CONF, {"= 127.0.0.1:8080": f"= 127.0.0.1:{port}",
                                             "ADD 127.0.0.1:8000": f"ADD 127.0.0.1:{backend_port}",
                                             "= 127.0.0.1:60000": f"= 127.0.0.1:{management_port}"})
    with _perlbal(config, [port, management_port]) as pid:
        yield Proxy(port, pid)


@contextmanager
def run_perlbal_storage(docroot: Path) -> Iterator[StorageProxy]:
    """Perlbal as a MogileFS storage node, configured as mogstored configures it, serving ``docroot``.

    As with mogstored, a PUT needs its first directory (the device, ``dev<devid>/``) to exist
    already; the directories below it are created by the PUT.
    """
    port = free_port()
    config = f"""
CREATE SERVICE storage
  SET role = web_server
  SET listen = 127.0.0.1:{port}
  SET docroot = {docroot}
  SET dirindexing = 0
  SET enable_put = on
  SET enable_delete = on
  SET min_put_directory = 1
  SET persist_client = on
ENABLE storage
"""
    with _perlbal(config, [port]) as pid:
        yield StorageProxy(port, pid, f"http://127.0.0.1:{port}")


@contextmanager
def run_nginx_front(backend_port: int) -> Iterator[Proxy]:
    """nginx with the shipped ``examples/nginx.conf``, its two ports replaced by free ones."""
    program = require_program("nginx", "nginx")
    port = free_port()
    config = _shipped(SHIPPED_NGINX_CONF, {"listen 127.0.0.1:8080;": f"listen 127.0.0.1:{port};",
                                           "server 127.0.0.1:8000;": f"server 127.0.0.1:{backend_port};"})
    with tempfile.TemporaryDirectory(prefix="nginx-") as directory:
        prefix = Path(directory)
        prefix.chmod(0o755)  # nginx's workers (nobody, under root) go through it to write tmp/proxy
        (prefix / "nginx.conf").write_text(config)
        (prefix / "tmp").mkdir()  # the config's temp paths are relative to the prefix
        # -e: the log goes to stderr from the start, before the config's error_log is read.
        command = [program, "-p", f"{prefix}/", "-c", "nginx.conf", "-e", "stderr"]
        with _running(command, [port], prefix) as pid:
            yield Proxy(port, pid)


def _shipped(path: Path, ports: dict[str, str]) -> str:
    """The configuration shipped at ``path`` with each line of a port in ``ports`` replaced."""
    config = path.read_text()
    for shipped, ours in ports.items():
        # Exactly one of each, or the test would not run the configuration users get.
        assert config.count(shipped) == 1, f"{path} should hold {shipped!r} once"
        config = config.replace(shipped, ours)
    return config


@contextmanager
def _perlbal(config: str, ports: Sequence[int]) -> Iterator[int]:
    """Perlbal in the foreground on ``config``; yields its PID once every port in ``ports`` accepts."""
    program = require_program("perlbal", "perlbal")
    with tempfile.TemporaryDirectory(prefix="perlbal-") as directory:
        path = Path(directory) / "perlbal.conf"
        path.write_text(config)
        with _running([program, f"--config={path}"], ports, Path(directory)) as pid:
            yield pid


@contextmanager
def _running(command: Sequence[str], ports: Sequence[int], directory: Path) -> Iterator[int]:
    """Run ``command``, its output in ``directory``; yield its PID once ``ports`` accept, stop it after."""
    log_path = directory / "output.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_SECONDS
            while not all(port_accepts(port) for port in ports):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{command[0]} did not start (exit status {process.poll()}):\n"
                                         + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.02)
            yield process.pid
        finally:
            stop_process(process)
