"""Reproxy answers under gunicorn, straight (2) and through Perlbal (5, 7a)."""

from __future__ import annotations

from contextlib import ExitStack
from urllib.parse import urlsplit

from . import servers
from .apps import answer_headers, constant_env
from .cluster import PERLBAL_OPTIONS, SMALL_KEY, SMALL_PATH, Cluster
from .loads import Rate, concurrency, cpu_note, throughput
from .measure import interleaved
from .report import Figure

#: wrk runs straight to gunicorn, with a few connections.
STRAIGHT_SECONDS = 5.0
STRAIGHT_CONNECTIONS = 4
#: wrk runs through Perlbal, with more connections, as Perlbal waits on two backends per request.
FRONT_SECONDS = 3.0
FRONT_CONNECTIONS = 8
#: Long enough for Perlbal's reproxy cache to hold the answer through the whole run.
PERLBAL_CACHE_SECONDS = 600


def reproxy(cluster: Cluster, repeat: int) -> list[Figure]:
    """2, 5a–c and 7a, against an app answering the middleware's headers (the ceiling) and Perlbal
    proxying straight to the storage node."""
    ceiling_headers = answer_headers(cluster.middleware(**PERLBAL_OPTIONS), SMALL_PATH)
    workdir = cluster.workdir
    with ExitStack() as stack:
        ceiling = stack.enter_context(servers.gunicorn(workdir, "ceiling", constant_env(ceiling_headers)))
        wrapped = stack.enter_context(servers.gunicorn(workdir, "reproxy", cluster.middleware_env(**PERLBAL_OPTIONS)))
        cached = stack.enter_context(servers.gunicorn(
            workdir, "cached", cluster.middleware_env(**PERLBAL_OPTIONS, perlbal_cache_seconds=PERLBAL_CACHE_SECONDS)))
        ports = stack.enter_context(servers.front_proxy(workdir, {
            "ceiling": ceiling.port, "reproxy": wrapped.port, "cached": cached.port, "direct": cluster.node}))
        direct_path = urlsplit(cluster.replica(SMALL_KEY)).path

        def via(service: str) -> str:
            return f"http://{servers.HOST}:{ports[service]}{direct_path if service == 'direct' else SMALL_PATH}"

        def proxied(service: str, server: servers.Gunicorn | None = None, *, close: bool = False) -> Rate:
            return Rate(via(service), workdir, connections=FRONT_CONNECTIONS, seconds=FRONT_SECONDS, close=close,
                        cpu=server.cpu_seconds if server else None)

        straight = {name: Rate(server.url(SMALL_PATH), workdir, connections=STRAIGHT_CONNECTIONS,
                               seconds=STRAIGHT_SECONDS, cpu=server.cpu_seconds)
                    for name, server in (("bare", ceiling), ("wrapped", wrapped))}
        straight_rates = interleaved(repeat, straight)
        front = {"ceiling": proxied("ceiling", ceiling), "reproxy": proxied("reproxy", wrapped),
                 "cached": proxied("cached"), "direct": proxied("direct"),
                 "cached, closing": proxied("cached", close=True), "direct, closing": proxied("direct", close=True)}
        front_rates = interleaved(repeat, front)
        concurrent = concurrency("7a. 32 clients, reproxy via Perlbal", "ceiling app", via("reproxy"),
                                 via("ceiling"), workdir, repeat)
    return [
        throughput("2. reproxy under gunicorn", "bare app, same headers", straight_rates, "wrapped", "bare", 0.95,
                   note=cpu_note(straight["wrapped"], straight["bare"])),
        throughput("5a. via Perlbal, no reproxy cache", "ceiling app", front_rates, "reproxy", "ceiling", 0.95,
                   note=cpu_note(front["reproxy"], front["ceiling"])),
        throughput("5b. via Perlbal, reproxy cache", "Perlbal → node", front_rates, "cached", "direct", 0.9,
                   note="keep-alive clients, as in the other rows; Perlbal 1.80 writes a cache hit's headers "
                        "and body uncorked, so each waits ~40 ms for the client's delayed ACK (Nagle)"),
        throughput("5c. via Perlbal, reproxy cache, closing", "Perlbal → node", front_rates, "cached, closing",
                   "direct, closing", 0.9, note="a new client connection per request, for both"),
        concurrent,
    ]
