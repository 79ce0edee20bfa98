"""The WSGI middleware under ``gunicorn -k gevent``: one worker, a greenlet per client.

Under gevent's monkey patching the storage client's sockets, timeouts and ``poll`` are gevent's,
so a download waiting on its client or its storage node lets every other one go on; its locks are
gevent's too, unless the application was imported before the worker patched (``--preload``).
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import DOMAIN, require_module
from integration._gunicorn import run_gunicorn
from integration._slow_clients import node_connections, read_first_bytes, slow_downloads, storage_port, thread_count
from integration._wire_client import eventually, read_http_reply
from wiretools import PatternFile, pattern_md5

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.nodepool import IDLE_PER_NODE

require_module("gunicorn")
require_module("gevent")

MIB = 1024 * 1024
#: Twice what a stalled client and the worker's send buffer hold (4 MiB at most, tcp_wmem), so
#: an unfinished download is still reading from its storage node.
SIZE = 8 * MIB
CLIENTS = 100
#: gevent resolves names (even 127.0.0.1) in a pool of at most 10 threads; a thread per client
#: would be many more.
MAX_THREADS = 12
#: The front proxy, trusted; every other client (127.0.0.1) is served the body.
PROXY = "127.0.0.2"


def env_for(mogile: DevMogileFS) -> dict[str, str]:
    return {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": mogile.trackers[0], "MOGILE_REPROXY": "perlbal",
            "MOGILE_TRUSTED_PROXIES": PROXY}


def reproxy_answer(port: int, path: str) -> dict[str, str]:
    """The headers the middleware answers Perlbal at :data:`PROXY` with (a 200, no body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(PROXY, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n".encode())
        reply, _ = read_http_reply(sock, "GET", timeout=5)
    assert reply.status == 200 and reply.body == b""
    return reply.headers


def test_slow_clients_share_one_gevent_worker_and_a_client_that_leaves_frees_its_node(devmogile: DevMogileFS) -> None:
    """100 clients reading slowly from one gevent worker all get their first 64 KiB at once; the
    proxy is still answered, the few that read on get every byte, and one that leaves mid-file
    closes its storage connection."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_file("movie.mp4", PatternFile(SIZE), cls="thumb")
    node_port = storage_port(client, "movie.mp4")
    with run_gunicorn(env_for(devmogile), extra_args=["--worker-class", "gevent"]) as server:
        [worker] = server.worker_pids()
        started = time.monotonic()
        with slow_downloads(server.port, "/mogilefs/movie.mp4", CLIENTS) as sockets:
            first = [read_first_bytes(sock) for sock in sockets]  # each while the others stay open
            assert time.monotonic() - started < 10
            assert thread_count(worker) <= MAX_THREADS
            assert node_connections(node_port, worker) >= CLIENTS  # an unfinished download holds its node connection

            reproxied = reproxy_answer(server.port, "/mogilefs/movie.mp4")
            assert f":{node_port}/" in reproxied["x-reproxy-url"]
            assert reproxied["x-reproxy-expected-size"] == str(SIZE)

            leaving = sockets.pop()
            leaving.close()
            assert eventually(lambda: node_connections(node_port, worker), lambda n: n < CLIENTS, timeout=10) \
                == CLIENTS - 1, "a client left mid-file, its storage connection stayed"

            expected = pattern_md5(SIZE)
            for sock, received in zip(sockets[:3], first):
                reply, _ = read_http_reply(sock, "GET", pending=received, timeout=15)
                assert reply.status == 200 and len(reply.body) == SIZE
                assert hashlib.md5(reply.body).hexdigest() == expected
        # What stays open is the pool's: a connection whose body was read to its end, kept for reuse.
        assert eventually(lambda: node_connections(node_port, worker), lambda n: n <= 3, timeout=10) <= 3, \
            "clients left, their storage connections stayed"


@pytest.mark.parametrize("preload", [
    pytest.param([], id="imported-by-the-worker"),
    # The application is imported before the worker monkey-patches: its module-level locks are
    # the thread's, and one held across a wait for gevent would stop the whole worker.
    pytest.param(["--preload"], id="preloaded"),
])
def test_greenlets_share_the_kept_alive_node_connections(devmogile: DevMogileFS, preload: list[str]) -> None:
    """Many concurrent requests take and give back kept-alive storage connections; none waits
    on another for ever."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("small.txt", b"small file\n" * 100, cls="thumb")
    node_port = storage_port(client, "small.txt")
    # A worker that stops answering is killed (--timeout) and the server stops without waiting long.
    args = ["--worker-class", "gevent", "--timeout", "5", "--graceful-timeout", "2", *preload]
    with run_gunicorn(env_for(devmogile), extra_args=args) as server:

        def requests(count: int) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            try:
                for _ in range(count):
                    connection.request("GET", "/mogilefs/small.txt")
                    response = connection.getresponse()
                    assert response.status == 200 and response.read() == b"small file\n" * 100
            finally:
                connection.close()
            return count

        with ThreadPoolExecutor(40) as pool:
            assert sum(pool.map(requests, [15] * 40)) == 600
        # Kept for reuse, within the pool's bound (the last response may reach its client before
        # its worker has closed the connection the pool had no room for).
        kept = eventually(lambda: node_connections(node_port), lambda n: n <= IDLE_PER_NODE, timeout=5)
        assert 1 <= kept <= IDLE_PER_NODE


#: A path cache made before gevent patches (as the application of ``gunicorn --preload`` is), its
#: backend's stores waiting on gevent (as memcached's I/O does once patched): a lookup of "a"
#: storing, an invalidation of "a" meanwhile, then a lookup of "b" by a third greenlet.
INVALIDATED_AMID_A_STORE = """
import time
from mogile_middleware.cache import MemoryCache, PathCache

class SlowStores(MemoryCache):
    def set(self, *args):
        time.sleep(0.3)
        super().set(*args)

cache = PathCache(lambda key, previous: key.upper(), backend=SlowStores())
from gevent import monkey
monkey.patch_all()
import gevent
storing = gevent.spawn(cache.get, "a")
gevent.sleep(0.1)
invalidating = gevent.spawn(cache.invalidate, "a")
gevent.sleep(0.05)
other = gevent.spawn(cache.get, "b")
gevent.joinall([storing, invalidating, other], timeout=5)
print(storing.value, other.value, invalidating.successful())
"""


def test_an_invalidation_amid_a_store_stops_no_other_greenlet_of_a_preloaded_worker() -> None:
    """The cache's own lock, made before gevent patched, is the thread's: an invalidation waiting
    for a lookup's store must not hold it, or the next greenlet to take it stops the whole worker."""
    run = subprocess.run([sys.executable, "-c", INVALIDATED_AMID_A_STORE], capture_output=True, text=True,
                         timeout=20)
    assert run.stdout.split() == ["A", "B", "True"], run.stderr


#: An uploader made before gevent patches (as the Django storage's is when ``gunicorn --preload``
#: imports the application), then two uploads at once, each asking the tracker first which classes
#: keep checksums.
UPLOADS_AT_ONCE = """
import sys
from mogile_middleware import Client, Uploader

uploader = Uploader(Client(sys.argv[1], sys.argv[2:]))
from gevent import monkey
monkey.patch_all()
import gevent
uploads = [gevent.spawn(uploader.upload, f"at-once-{n}.txt", b"at once", "thumb") for n in range(2)]
gevent.joinall(uploads, timeout=10)
print(*(upload.value for upload in uploads))
"""


def test_uploads_at_once_stop_no_greenlet_of_a_preloaded_worker(devmogile: DevMogileFS) -> None:
    """An upload waiting for the tracker holds no lock of the uploader's: made before gevent
    patched, that one is the thread's, and the next upload taking it would stop the whole worker."""
    run = subprocess.run([sys.executable, "-c", UPLOADS_AT_ONCE, DOMAIN, *devmogile.trackers], capture_output=True,
                         text=True, timeout=30)
    assert run.stdout.split() == ["7", "7"], run.stderr
    assert Client(DOMAIN, devmogile.trackers).get_file_data("at-once-1.txt") == b"at once"


#: The Django storage imported and made before gevent patches (``gunicorn --preload``), then two
#: saves of one name at once, each asking the tracker whether the name is taken before renaming.
SAVES_AT_ONCE = """
import sys
import django
from django.conf import settings

settings.configure(MOGILEFS_DOMAIN=sys.argv[1], MOGILEFS_TRACKERS=sys.argv[2:], MOGILEFS_MEDIA_URL="/media/")
django.setup()
from django.core.files.base import ContentFile
from mogile_middleware.contrib.django.storage import MogileFSStorage

storage = MogileFSStorage()
from gevent import monkey
monkey.patch_all()
import gevent
saves = [gevent.spawn(storage.save, "same.txt", ContentFile(b"saved")) for _ in range(2)]
gevent.joinall(saves, timeout=10)
print(*sorted(str(save.value) for save in saves))
"""


def test_saves_at_once_stop_no_greenlet_of_a_preloaded_django_worker(devmogile: DevMogileFS) -> None:
    """A Django save renaming onto its name holds no lock made at import: that one would be the
    thread's, and the next save taking it while the first waits for the tracker would stop the worker."""
    require_module("django")
    run = subprocess.run([sys.executable, "-c", SAVES_AT_ONCE, DOMAIN, *devmogile.trackers], capture_output=True,
                         text=True, timeout=30)
    first, second = run.stdout.split() or ["", ""]
    assert first == "same.txt" and second.startswith("same_") and second.endswith(".txt"), run.stderr
    assert Client(DOMAIN, devmogile.trackers).get_file_data(second) == b"saved"


def memcached_connections_made(port: int) -> int:
    """memcached's count of the connections it has accepted since it started."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += sock.recv(65536)
    stats = dict(line.split()[1:3] for line in data.decode().splitlines() if line.startswith("STAT "))
    return int(stats["total_connections"])


def test_greenlets_share_the_memcached_connections(devmogile: DevMogileFS) -> None:
    """Each request asks the shared path cache; the worker keeps its memcached clients for the
    next requests rather than one per greenlet, that is one per request."""
    from integration._memcached import start_memcached

    Client(DOMAIN, devmogile.trackers).store_content("cached.txt", b"cached\n", cls="thumb")
    with start_memcached() as memcached, run_gunicorn(
            {**env_for(devmogile), "MOGILE_MEMCACHED": memcached.address},
            extra_args=["--worker-class", "gevent"]) as server:
        before = memcached_connections_made(memcached.port)
        for _ in range(50):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            connection.request("GET", "/mogilefs/cached.txt")
            assert connection.getresponse().read() == b"cached\n"
            connection.close()
        made = memcached_connections_made(memcached.port) - before - 1  # less the stats connection
        assert made <= 2, f"{made} memcached connections for 50 requests"
