"""The MogileFS under test: a Perlbal storage node and the development tracker, in a work directory.

One node and one replica per key keep every answer the same: the middleware's ``X-REPROXY-URL``
(the tracker lists replicas in random order) and the node a baseline talks to.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mogile_middleware import Client, MogileFSMiddleware
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.async_client import AsyncClient

from . import apps, servers

DOMAIN = "bench"
CLASS = "one"
SMALL_KEY = "small.bin"
SMALL_SIZE = 10 * 1024
SMALL_PATH = "/mogilefs/" + SMALL_KEY
#: The file of the serve mode loads (7b-c, 10g), as the issue sets them: a 100 KiB image.
MEDIUM_KEY = "medium.bin"
MEDIUM_SIZE = 100 * 1024
MEDIUM_PATH = "/mogilefs/" + MEDIUM_KEY
#: The middleware behind Perlbal, as the README deploys it.
PERLBAL_OPTIONS: dict[str, Any] = {"reproxy": "perlbal", "trusted_proxies": [servers.HOST]}
#: Where the work directory goes: memory, so that the disk is not what is measured.
TMPFS = Path("/dev/shm")
#: A whole number of pattern periods: written over and over, it continues the pattern.
_PATTERN_CHUNK = apps.pattern(apps.PERIOD * 4096)


@dataclass(frozen=True)
class Cluster:
    """The running storage node and tracker, a client, and the work directory for servers' files."""

    workdir: Path
    node: servers.Server
    tracker: str
    client: Client

    def store(self, key: str, size: int) -> None:
        """Store ``size`` bytes of the test pattern under ``key``, streamed from a file."""
        source = self.workdir / "source.bin"
        with open(source, "wb") as out:
            out.writelines(_PATTERN_CHUNK[:size - offset] for offset in range(0, size, len(_PATTERN_CHUNK)))
        with open(source, "rb") as data:
            self.client.store_file(key, data, cls=CLASS)
        source.unlink()

    def replica(self, key: str) -> str:
        """The URL of the (only) replica of ``key``."""
        return self.client.get_paths(key)[0]

    def middleware(self, **options: Any) -> MogileFSMiddleware:
        """The middleware with ``options``, in this process, with a tracker connection of its own."""
        return MogileFSMiddleware(apps.hello, client=Client(DOMAIN, [self.tracker]), **options)

    def asgi_middleware(self, **options: Any) -> ASGIMiddleware:
        """The ASGI middleware with ``options``, in this process: its tracker connection is made in
        the event loop that first calls it (close it there with ``client.aclose()``)."""
        return ASGIMiddleware(apps.hello_asgi, client=AsyncClient(DOMAIN, [self.tracker]), **options)

    def middleware_env(self, **options: Any) -> dict[str, str]:
        """The environment for gunicorn or uvicorn to run the middleware with ``options``."""
        return apps.middleware_env(DOMAIN, self.tracker, options)


@contextmanager
def cluster() -> Iterator[Cluster]:
    """Start the storage node and the tracker in a fresh work directory; stop and remove all after."""
    parent = TMPFS if TMPFS.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="mogile-bench-", dir=parent) as workdir, ExitStack() as stack:
        path = Path(workdir)
        node = stack.enter_context(servers.storage_node(path, 1))
        tracker = stack.enter_context(servers.tracker(path, DOMAIN, {CLASS: 1}, [node.port]))
        client = Client(DOMAIN, [tracker], storage_timeout=60)
        stack.callback(client.close)
        # One node holds one copy: no class can keep more, the default one (2 copies) included.
        client.pool.request("update_class", {"domain": DOMAIN, "class": "default", "mindevcount": 1})
        yield Cluster(path, node, tracker, client)
