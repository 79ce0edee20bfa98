"""What the public objects show of themselves in a log line, a debugger or an error message:
where they point, never a secret."""

from __future__ import annotations

from mogile_middleware import Admin, AsyncClient, Client, MemoryCache, MogileFSMiddleware, Uploader
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.memcache import MemcachedBackend

CLIENT = "<Client of domain 'media' via <TrackerPool 10.0.0.1:7001, [2001:db8::1]:7001>>"


def test_a_client_shows_its_domain_and_trackers() -> None:
    client = Client("media", "10.0.0.1:7001 [2001:db8::1]:7001")
    assert repr(client) == CLIENT
    assert repr(Uploader(client)) == f"<Uploader through {CLIENT}>"
    assert repr(AsyncClient("thumbs", "10.0.0.2")) == (
        "<AsyncClient of domain 'thumbs' via <AsyncTrackerPool 10.0.0.2:7001>>")
    assert repr(Admin("10.0.0.1:7001")) == "<Admin via <TrackerPool 10.0.0.1:7001>>"


def test_a_middleware_shows_its_prefix_its_mode_and_its_client() -> None:
    wsgi = MogileFSMiddleware(lambda *args: None, client=Client("media", "10.0.0.1:7001 [2001:db8::1]:7001"),
                              prefix="/media/")
    assert repr(wsgi) == f"<MogileFSMiddleware of '/media/', serving bodies, through {CLIENT}>"
    asgi = ASGIMiddleware(lambda *args: None, domain="media", trackers="10.0.0.1:7001", reproxy="nginx",
                          trusted_proxies=["127.0.0.1"])
    assert repr(asgi) == ("<MogileFSMiddleware of '/mogilefs/', reproxy='nginx', through "
                          "<AsyncClient of domain 'media' via <AsyncTrackerPool 10.0.0.1:7001>>>")


def test_caches_show_their_bounds_and_servers_but_no_secret() -> None:
    cache = MemoryCache(max_entries=5)
    cache.set("a", None, 0.0, 60)
    assert repr(cache) == "<MemoryCache holding 1 of at most 5 entries>"
    backend = MemcachedBackend("10.0.0.3:11211 [2001:db8::3] unix:/run/memcached.sock", secret="s3cret-value")
    assert repr(backend) == ("<MemcachedBackend 10.0.0.3:11211, [2001:db8::3]:11211, /run/memcached.sock, "
                             "prefix 'mogile:', signed>")
    assert "s3cret" not in repr(backend)
    assert repr(MemcachedBackend(client=object(), prefix="site:")) == (
        "<MemcachedBackend through the client given, prefix 'site:'>")
