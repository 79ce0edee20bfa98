"""Reproxy answers under gunicorn, straight (2) and through Perlbal (5, 7a), and under uvicorn (8b)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

from . import servers
from .apps import Headers, answer_headers, asgi_answer_headers, constant_env, lookup_env
from .cluster import PERLBAL_OPTIONS, SMALL_KEY, SMALL_PATH, Cluster
from .loads import Rate, concurrency, cpu_note, throughput
from .measure import Spread, interleaved, ratios
from .report import Figure

#: wrk runs straight to gunicorn or uvicorn, with a few connections: short runs, several per
#: repetition, as the machine's pace changes within seconds and the median of many short runs
#: moves less from one measurement to the next than that of a few long ones.
STRAIGHT_SECONDS = 1.0
STRAIGHT_RUNS = 5
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
        twin = stack.enter_context(servers.gunicorn(workdir, "twin", constant_env(ceiling_headers)))
        wrapped = stack.enter_context(servers.gunicorn(workdir, "reproxy", cluster.middleware_env(**PERLBAL_OPTIONS)))
        cached = stack.enter_context(servers.gunicorn(
            workdir, "cached", cluster.middleware_env(**PERLBAL_OPTIONS, perlbal_cache_seconds=PERLBAL_CACHE_SECONDS)))
        ports = stack.enter_context(servers.front_proxy(workdir, {
            "ceiling": ceiling.port, "reproxy": wrapped.port, "cached": cached.port, "direct": cluster.node.port}))
        direct_path = urlsplit(cluster.replica(SMALL_KEY)).path

        def via(service: str) -> str:
            return f"http://{servers.HOST}:{ports[service]}{direct_path if service == 'direct' else SMALL_PATH}"

        def proxied(service: str, server: servers.Server | None = None, *, close: bool = False) -> Rate:
            return Rate(via(service), workdir, connections=FRONT_CONNECTIONS, seconds=FRONT_SECONDS, close=close,
                        cpu=server.cpu_seconds if server else None)

        straight_figure = straight("2. reproxy under gunicorn", [{"bare": ceiling, "wrapped": wrapped, "twin": twin}],
                                   workdir, repeat * STRAIGHT_RUNS, "gunicorn")
        front = {"ceiling": proxied("ceiling", ceiling), "reproxy": proxied("reproxy", wrapped),
                 "cached": proxied("cached"), "direct": proxied("direct"),
                 "cached, closing": proxied("cached", close=True), "direct, closing": proxied("direct", close=True)}
        front_rates = interleaved(repeat, front)
        concurrent = concurrency("7a. 32 clients, reproxy via Perlbal", "ceiling app", via("reproxy"),
                                 via("ceiling"), workdir, repeat)
    return [
        straight_figure,
        throughput("5a. via Perlbal, no reproxy cache", "ceiling app", front_rates, "reproxy", "ceiling", 0.95,
                   note=cpu_note(front["reproxy"].cpu_per_request, front["ceiling"].cpu_per_request)),
        throughput("5b. via Perlbal, reproxy cache", "Perlbal → node", front_rates, "cached", "direct", 0.9,
                   note="keep-alive clients, as in the other rows; Perlbal 1.80 writes a cache hit's headers "
                        "and body uncorked, so each waits ~40 ms for the client's delayed ACK (Nagle)"),
        throughput("5c. via Perlbal, reproxy cache, closing", "Perlbal → node", front_rates, "cached, closing",
                   "direct, closing", 0.9, note="a new client connection per request, for both"),
        concurrent,
    ]


#: uvicorn workers in 8b: one, as wrk's few connections would go to several at random (the
#: kernel gives each to whichever worker accepts first; all to one in a third of the runs seen),
#: and the rate would measure that draw. One worker on one core, wrk on the other, measures the app.
ASGI_WORKERS = 1


def asgi_reproxy(cluster: Cluster, repeat: int) -> Figure:
    """8b. The ASGI middleware under a uvicorn worker, against an ASGI app sending the same
    headers under the same uvicorn; the note adds the floor of any middleware
    (:func:`~bench.apps.lookup_asgi_middleware`) against the same app. Each repetition starts
    its servers anew: one worker process runs faster or slower than another of the same app,
    by up to a tenth for a whole run, which the repetitions then average out."""
    headers = asyncio.run(_asgi_headers(cluster))
    return straight("8b. reproxy under uvicorn", _asgi_servers(cluster, headers, repeat), cluster.workdir,
                    STRAIGHT_RUNS, "uvicorn")


def _asgi_servers(cluster: Cluster, headers: Headers, repeat: int) -> Iterator[dict[str, servers.Server]]:
    """8b's servers, started anew for each of ``repeat`` rounds (stopped as the next is asked for)."""
    for _ in range(repeat):
        with servers.uvicorn(cluster.workdir, "ceiling", constant_env(headers), ASGI_WORKERS) as ceiling, \
                servers.uvicorn(cluster.workdir, "twin", constant_env(headers), ASGI_WORKERS) as twin, \
                servers.uvicorn(cluster.workdir, "reproxy", cluster.middleware_env(**PERLBAL_OPTIONS),
                                ASGI_WORKERS) as wrapped, \
                servers.uvicorn(cluster.workdir, "lookup", lookup_env(headers, SMALL_PATH), ASGI_WORKERS) as floor:
            yield {"bare": ceiling, "wrapped": wrapped, "twin": twin, "floor": floor}


async def _asgi_headers(cluster: Cluster) -> Headers:
    """The headers of the ASGI middleware's reproxy answer for :data:`SMALL_PATH`."""
    middleware = cluster.asgi_middleware(**PERLBAL_OPTIONS)
    try:
        return await asgi_answer_headers(middleware, SMALL_PATH)
    finally:
        await middleware.client.aclose()


def straight(name: str, rounds: Iterable[Mapping[str, servers.Server]], workdir: Path, runs: int,
             server_name: str) -> Figure:
    """wrk straight to the middleware's server (``wrapped``) against the bare app's (``bare``),
    ``runs`` times each in every round of servers, held to ``ratio >= 0.95``. In the same turns,
    for the note: ``twin``, a second server of the bare app, whose ratio against the first is
    what the figure can tell apart on the machine; with ``floor``, that server's ratio."""
    samples: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for started in rounds:
        rates = {which: Rate(server.url(SMALL_PATH), workdir, connections=STRAIGHT_CONNECTIONS,
                             seconds=STRAIGHT_SECONDS, cpu=server.cpu_seconds)
                 for which, server in started.items()}
        for which, values in interleaved(runs, rates).items():
            samples[which] += values
            cpu[which] += rates[which].cpu_per_request

    def against_bare(which: str) -> str:
        ratio = Spread.of(ratios(samples[which], samples["bare"]))
        return (f"ratio {ratio.median:.3g} [{ratio.low:.3g}–{ratio.high:.3g}], "
                f"{Spread.of(cpu[which]).median:.0f} µs/request")

    note = (cpu_note(cpu["wrapped"], cpu["bare"], server_name)
            + f"; a second server of the bare app (what the figure tells apart): {against_bare('twin')}")
    if "floor" in samples:
        note += f"; a middleware answering from a dict by path (the floor of any): {against_bare('floor')}"
    return throughput(name, "bare app, same headers", samples, "wrapped", "bare", 0.95, note=note)
