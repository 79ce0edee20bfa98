"""``python -m bench.async_storage``: which HTTP layer should :mod:`mogile_middleware.async_storage` use?

Against one development storage node on 127.0.0.1, each candidate does (a) 2000 sequential GETs of
a 10 KiB file (requests/s), (b) one 256 MiB GET read in 64 KiB chunks (MiB/s), (c) the peak RSS
growth of (b); each ratio is against a raw ``asyncio.open_connection`` read of the same run. Every
candidate opens a new connection per request, as the module does for now.

Each candidate runs in a child process of its own (the node's threads would otherwise share the
GIL with it, and one candidate's imports or heap would count against the next); the repetitions
rotate the order. The whole run takes about a minute and is cut at two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from mogile_middleware import Client
from mogile_middleware.async_storage import CHUNK_SIZE, open_replica
from mogile_middleware.devserver import DevMogileFS

from .measure import Spread, rotated

SMALL_SIZE = 10 * 1024
BIG_SIZE = 256 * 1024 * 1024
GETS = 2000
TIMEOUT = 10.0
#: No repetition starts that would end past RUN_SECONDS; a child still running at LIMIT_SECONDS is killed.
RUN_SECONDS = 90.0
LIMIT_SECONDS = 115.0

#: A GET of one URL: (url) -> number of body bytes read.
Fetch = Callable[[str], Awaitable[int]]


# -- the candidates (run in a child process) --------------------------------------------------

def _request(url: str) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    return host, port, f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()


async def raw_candidate() -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    """The baseline: a request written and everything read to EOF, nothing parsed."""
    async def fetch(url: str) -> int:
        host, port, request = _request(url)
        reader, writer = await asyncio.open_connection(host, port, limit=CHUNK_SIZE)
        writer.write(request)
        total = 0
        while chunk := await reader.read(CHUNK_SIZE):
            total += len(chunk)
        writer.close()
        return total

    return fetch, _nothing


async def module_candidate() -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    """A non-blocking socket and a head parser of our own: mogile_middleware.async_storage itself."""
    async def fetch(url: str) -> int:
        total = 0
        async with await open_replica([url], timeout=TIMEOUT) as replica:
            async for chunk in replica.chunks(CHUNK_SIZE):
                total += len(chunk)
        return total

    return fetch, _nothing


async def h11_candidate() -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    """h11 over asyncio streams, with the same deadline on the head and timeout per read."""
    import h11

    async def head(url: str) -> tuple[h11.Connection, asyncio.StreamReader, asyncio.StreamWriter]:
        host, port, _ = _request(url)
        reader, writer = await asyncio.open_connection(host, port, limit=CHUNK_SIZE)
        connection = h11.Connection(h11.CLIENT)
        writer.write(connection.send(h11.Request(
            method="GET", target=urlsplit(url).path, headers=[("Host", f"{host}:{port}"), ("Connection", "close")])))
        writer.write(connection.send(h11.EndOfMessage()))
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(CHUNK_SIZE))
            elif isinstance(event, h11.Response):
                return connection, reader, writer

    async def fetch(url: str) -> int:
        connection, reader, writer = await asyncio.wait_for(head(url), TIMEOUT)
        total = 0
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await asyncio.wait_for(reader.read(CHUNK_SIZE), TIMEOUT))
                elif isinstance(event, h11.Data):
                    total += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return total
                else:
                    raise RuntimeError(f"unexpected {event!r}")
        finally:
            writer.close()

    return fetch, _nothing


async def httpx_candidate() -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    """httpx.AsyncClient, keep-alive off."""
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=TIMEOUT)

    async def fetch(url: str) -> int:
        total = 0
        async with client.stream("GET", url) as response:
            response.raise_for_status()
            async for chunk in response.aiter_raw(CHUNK_SIZE):
                total += len(chunk)
        return total

    return fetch, client.aclose


async def aiohttp_candidate() -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    """aiohttp.ClientSession, keep-alive off."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                    timeout=aiohttp.ClientTimeout(sock_connect=TIMEOUT, sock_read=TIMEOUT))

    async def fetch(url: str) -> int:
        total = 0
        async with session.get(url) as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                total += len(chunk)
        return total

    return fetch, session.close


async def _nothing() -> None:
    pass


CANDIDATES: dict[str, Callable[[], Awaitable[tuple[Fetch, Callable[[], Awaitable[None]]]]]] = {
    "raw socket (baseline)": raw_candidate,
    "non-blocking socket + own parser": module_candidate,
    "h11 over asyncio streams": h11_candidate,
    "httpx.AsyncClient": httpx_candidate,
    "aiohttp": aiohttp_candidate,
}
BASELINE = "raw socket (baseline)"


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))  # type: ignore[union-attr]


def _reset_peak_rss() -> None:
    """Start VmHWM (the peak RSS) again from the current RSS (Linux 4.0 and later)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


async def measure(name: str, small_url: str, big_url: str) -> dict[str, float]:
    fetch, close = await CANDIDATES[name]()
    try:
        await fetch(small_url)  # warm up: imports, first connection
        started = time.perf_counter()
        for _ in range(GETS):
            if await fetch(small_url) < SMALL_SIZE:
                raise RuntimeError(f"{name}: short small body")
        rate = GETS / (time.perf_counter() - started)
        rss_before = _kib("VmRSS")
        _reset_peak_rss()
        started = time.perf_counter()
        size = await fetch(big_url)
        seconds = time.perf_counter() - started
        growth = _kib("VmHWM") - rss_before
        if size < BIG_SIZE:
            raise RuntimeError(f"{name}: read {size} of {BIG_SIZE} bytes")
    finally:
        await close()
    return {"gets_per_second": rate, "mib_per_second": BIG_SIZE / 2**20 / seconds, "rss_growth_mib": growth / 1024}


# -- the run (parent process) -----------------------------------------------------------------

def _raw_head(url: str, method: str = "GET", extra: str = "", body: bytes = b"") -> str:
    """The status line and headers a node sends back, as text."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"{method} {parts.path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    return reply.split(b"\r\n\r\n")[0].decode("latin-1").lower()


def check_framing(small_url: str) -> str:
    """Every answer of the node frames its body with Content-Length, none is chunked."""
    missing = small_url.rsplit("/", 1)[0] + "/9999999999.fid"
    heads = {
        "GET 200": _raw_head(small_url),
        "GET 206": _raw_head(small_url, extra="Range: bytes=0-9\r\n"),
        "GET 416": _raw_head(small_url, extra="Range: bytes=999999-\r\n"),
        "GET 404": _raw_head(missing),
        "HEAD 200": _raw_head(small_url, "HEAD"),
        "PUT 200": _raw_head(missing, "PUT", "Content-Length: 2\r\n", b"ok"),
        "PUT 200 chunked": _raw_head(missing, "PUT", "Transfer-Encoding: chunked\r\n", b"2\r\nok\r\n0\r\n\r\n"),
        "DELETE 204": _raw_head(missing, "DELETE"),
    }
    for what, head in heads.items():
        chunked = "transfer-encoding" in head
        framed = "\r\ncontent-length: " in head or what.endswith("204")
        if chunked or not framed or f" {what.split()[1]} " not in head.split("\r\n")[0] + " ":
            raise RuntimeError(f"{what}: unexpected answer {head!r}")
    return ", ".join(heads) + ": Content-Length on every body (none on the 204), no Transfer-Encoding"


def pin_cpus() -> set[int] | None:
    """Keep this process (the node's threads) on one CPU and return the others, for the children:
    on a small machine, the two otherwise take turns on the same CPU and the figures jitter."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, {cpus[0]})
    return set(cpus[1:])


def run_child(name: str, small_url: str, big_url: str, cpus: set[int] | None, seconds: float) -> dict[str, float]:
    argv = [sys.executable, "-m", "bench.async_storage", "--child", name, small_url, big_url]
    output = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None).stdout
    return json.loads(output.strip().splitlines()[-1])


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) if n == 0 else cell.rjust(width) for n, (cell, width) in enumerate(zip(cells, widths)))


def report(samples: dict[str, list[dict[str, float]]]) -> str:
    def spread(name: str, field: str) -> Spread:
        return Spread.of([sample[field] for sample in samples[name]])

    def ratio(name: str, field: str) -> Spread:
        return Spread.of([sample[field] / base[field] for sample, base in zip(samples[name], samples[BASELINE])])

    header = ["candidate", "GETs/s (10 KiB)", "ratio", "MiB/s (256 MiB)", "ratio", "peak RSS growth MiB", "vs base"]
    rows = []
    base_rss = spread(BASELINE, "rss_growth_mib").median
    for name in samples:
        gets, mib, rss = spread(name, "gets_per_second"), spread(name, "mib_per_second"), spread(name, "rss_growth_mib")
        rows.append([
            name,
            f"{gets.median:.0f} ({gets.low:.0f}-{gets.high:.0f})", f"{ratio(name, 'gets_per_second').median:.2f}",
            f"{mib.median:.0f} ({mib.low:.0f}-{mib.high:.0f})", f"{ratio(name, 'mib_per_second').median:.2f}",
            f"{rss.median:.1f} ({rss.low:.1f}-{rss.high:.1f})", f"{rss.median - base_rss:+.1f}",
        ])
    widths = [max(len(row[n]) for row in [header, *rows]) for n in range(len(header))]
    rule = "  ".join("-" * width for width in widths)
    return "\n".join([_row(header, widths), rule, *(_row(row, widths) for row in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.async_storage", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="runs of every candidate (default: 4)")
    parser.add_argument("--child", nargs=3, metavar=("CANDIDATE", "SMALL_URL", "BIG_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(measure(*args.child))))
        return 0
    started = time.monotonic()
    with DevMogileFS(storage_nodes=1, domains={"d": {"c": 1}}) as mogile:
        client = Client("d", mogile.trackers)
        client.store_content("small", bytes(range(256)) * (SMALL_SIZE // 256), "c")
        big = bytes(range(256)) * (BIG_SIZE // 256)
        client.store_content("big", big, "c")
        del big
        (small_url,), (big_url,) = client.get_paths("small"), client.get_paths("big")
        client.close()
        print(f"framing on the development node: {check_framing(small_url)}")
        cpus = pin_cpus()
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in CANDIDATES}
        rep_seconds = 0.0
        for rep in range(args.repeat):
            rep_started = time.monotonic()
            if rep_started + rep_seconds - started > RUN_SECONDS:
                print(f"stopped after {rep} repetitions: another would pass {RUN_SECONDS:g} s")
                break
            try:
                for name in rotated(list(CANDIDATES), rep):
                    seconds = started + LIMIT_SECONDS - time.monotonic()
                    samples[name].append(run_child(name, small_url, big_url, cpus, seconds))
            except subprocess.TimeoutExpired:
                print(f"repetition {rep + 1} cut at {LIMIT_SECONDS:g} s")
                for runs in samples.values():  # it counts for no candidate
                    del runs[rep:]
                break
            rep_seconds = time.monotonic() - rep_started
    if not samples[BASELINE]:
        print("no complete repetition")
        return 1
    print(f"{len(samples[BASELINE])} runs each (median, low-high), one connection per request, "
          f"client on CPUs {sorted(cpus) if cpus else 'any'}, {time.monotonic() - started:.0f} s")
    print(report(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
