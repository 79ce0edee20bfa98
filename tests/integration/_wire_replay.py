"""Replaying the captured mogilefsd / mogstored transcripts (tests/data/mogile-wire) against the dev MogileFS.

The exchanges come from ``all.jsonl`` (exact bytes); the comments of the ``.txt`` transcripts tell
what happened off the wire (unrecorded uploads, a storage node stopped and restarted), and the
replay repeats those steps. Identifiers are mapped: the transcript's devices (ports 7500/7502,
devids 1/2) become ours, per fid, because each tracker picks devices at random; fids are not
mapped, since the replay creates exactly as many fids, in the same order, as the capture did.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from integration._wire_client import HTTPReply, LineClient, eventually, http_request, read_http_reply, upload

from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.protocol import decode_args

WIRE_DIR = Path(__file__).resolve().parents[1] / "data" / "mogile-wire"
#: Storage ports of the capture and the devid each one served.
TRANSCRIPT_DEVICE_OF_PORT = {7500: 1, 7502: 2}
DOMAIN = "testdom"

_URL = re.compile(rb"http://127\.0\.0\.1:(\d+)/dev(\d+)/(\d/\d{3}/\d{3}/(\d{10})\.fid)")
_QUOTED_URL = re.compile(rb"http%3A%2F%2F127\.0\.0\.1%3A(\d+)%2Fdev(\d+)%2F(\d%2F\d{3}%2F\d{3}%2F(\d{10})\.fid)")
_FID_ARG = re.compile(rb"(?:^|[ &])fid=(\d+)")
_DESTDEV = re.compile(rb"(invalid\+dest\+)(\d+)(\.\+Valid\+devices\+were:\+)([\d,]+)")
_HTTP_PATH = re.compile(rb"^(\w+) /dev(\d+)/(?:(?:\d/\d{3}/\d{3}/(\d{10})\.fid)?[^ ]*) ", re.MULTILINE)


@dataclass
class Exchange:
    """One recorded exchange, with the transcript comments (and unrecorded steps) that precede it."""

    n: int
    file: str
    title: str
    conn: str
    sent: bytes
    recv: bytes
    closed: bool
    notes: list[str]


def load_exchanges() -> list[Exchange]:
    """Every exchange of ``all.jsonl`` in capture order, each with the notes of its ``.txt`` file."""
    records = [json.loads(line) for line in (WIRE_DIR / "all.jsonl").read_text().splitlines() if line.strip()]
    sections = {name: _recorded_sections(WIRE_DIR / name) for name in {record["file"] for record in records}}
    exchanges = []
    for record in sorted(records, key=lambda record: record["n"]):
        title, notes = sections[record["file"]].pop(0)
        assert title == record["title"], (record["n"], title, record["title"])
        exchanges.append(
            Exchange(
                record["n"],
                record["file"],
                title,
                record["conn"],
                bytes.fromhex(record["sent_hex"]),
                bytes.fromhex(record["recv_hex"]),
                bool(record.get("closed")),
                notes,
            )
        )
    assert not any(sections.values()), "transcript sections without a recorded exchange"
    return exchanges


def _recorded_sections(path: Path) -> list[tuple[str, list[str]]]:
    """``(title, notes)`` of every section of a transcript that has bytes on the wire.

    Notes are the ``#`` comments before the section's first bytes, plus ``## `` titles of
    sections that were not recorded (setup steps done off the wire).
    """
    sections: list[tuple[str, list[str]]] = []
    pending: list[str] = []
    title, recorded = "", True
    for line in path.read_text(encoding="ascii").splitlines():
        if line.startswith("## "):
            title, recorded = line[3:], False
            pending.append(line)
        elif line[:1] in (">", "<") and not recorded:
            pending.remove(f"## {title}")
            sections.append((title, pending))
            pending, recorded = [], True
        elif line.startswith("#"):
            pending.append(line)
    return sections


@dataclass
class DeviceMap:
    """Which of our devices plays each transcript device: per fid, and for node-level events."""

    ports: dict[int, int]  # our devid -> our storage port
    nodes: dict[int, int] = field(default_factory=dict)  # transcript devid -> ours, outside a fid
    by_fid: dict[int, dict[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes = {devid: devid for devid in self.ports}

    def of(self, fid: int | None) -> dict[int, int]:
        """Transcript devid -> our devid for ``fid`` (the node-level map for an unknown fid)."""
        return self.by_fid.get(fid or 0, self.nodes)

    def learn(self, fid: int, pairs: list[tuple[int, int]]) -> None:
        """Record that transcript device ``a`` is our device ``b`` for ``fid`` (the rest paired in order)."""
        mapping = dict(pairs)
        spare = [devid for devid in sorted(self.ports) if devid not in mapping.values()]
        for devid in sorted(self.ports):
            if devid not in mapping:
                mapping[devid] = spare.pop(0)
        self.by_fid[fid] = mapping

    def url(self, match: re.Match[bytes], quoted: bool) -> bytes:
        """Our URL for a transcript URL matched by ``_URL`` / ``_QUOTED_URL``."""
        devid = self.of(int(match.group(4)))[int(match.group(2))]
        colon, slash = (b"%3A", b"%2F") if quoted else (b":", b"/")
        return (
            b"http"
            + colon
            + slash * 2
            + b"127.0.0.1"
            + colon
            + str(self.ports[devid]).encode()
            + slash
            + (b"dev%d" % devid)
            + slash
            + match.group(3)
        )

    def map_urls(self, data: bytes) -> bytes:
        """Every transcript URL in ``data`` (plain or percent-encoded) replaced by ours."""
        data = _URL.sub(lambda match: self.url(match, False), data)
        return _QUOTED_URL.sub(lambda match: self.url(match, True), data)

    def map_request(self, line: bytes) -> bytes:
        """A tracker request with the transcript's devids and URLs replaced by ours."""
        mapping = self.of(_fid_in(line))
        line = re.sub(rb"(?<=[ &])devid=(\d+)", lambda match: b"devid=%d" % mapping[int(match.group(1))], line)
        return self.map_urls(line)

    def map_err(self, line: bytes, fid: int | None) -> bytes:
        """A transcript ERR line with our URLs and devids (invalid_destdev names devids)."""
        mapping = self.of(fid)

        def destdev(match: re.Match[bytes]) -> bytes:
            valid = b",".join(b"%d" % mapping[int(devid)] for devid in match.group(4).split(b","))
            return match.group(1) + b"%d" % mapping[int(match.group(2))] + match.group(3) + valid

        return _DESTDEV.sub(destdev, self.map_urls(line))

    def map_args(self, args: dict[str, str], fid: int | None) -> dict[str, str]:
        """Transcript OK arguments rewritten with our devids, hostids, ports and URLs."""
        mapping = self.of(int(args.get("fid") or args.get("fid_fid") or fid or 0))
        ours: dict[str, str] = {}
        for name, value in args.items():
            value = self.map_urls(value.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
            if re.fullmatch(r"devid(_\d+)?", name):
                value = str(mapping[int(value)])
            elif name in ("devids", "tempfile_devids"):
                value = ",".join(str(mapping[int(devid)]) for devid in value.split(","))
            elif match := re.fullmatch(r"devpath_(\d+)", name):
                name = f"devpath_{mapping[int(match.group(1))]}"
            elif re.fullmatch(r"(dev\d+_devid|dev\d+_hostid|host\d+_hostid)", name):
                value = str(self.nodes[int(value)])
            elif re.fullmatch(r"host\d+_http_port", name):
                value = str(self.ports[self.nodes[TRANSCRIPT_DEVICE_OF_PORT[int(value)]]])
            ours[name] = value
        return ours


def _fid_in(data: bytes) -> int | None:
    """The fid a request is about: its ``fid`` argument, else the fid of the first URL in it."""
    if match := _FID_ARG.search(data):
        return int(match.group(1))
    for pattern in (_URL, _QUOTED_URL):
        if match := pattern.search(data):
            return int(match.group(4))
    return None


def ok_args(line: bytes) -> dict[str, str]:
    """The arguments of an ``OK`` line."""
    return decode_args(line[3:].rstrip(b"\r\n"))


def canonical(args: dict[str, str]) -> dict[str, object]:
    """OK arguments with the groups whose numbering is arbitrary turned into sorted lists.

    ``pathN`` (random order on both trackers), ``domainNclassM*`` (Perl hash order), ``hostN_*``
    and ``devN_*`` become sorted lists; ``devids`` lists are sorted.
    """
    flat: dict[str, object] = {}
    groups: dict[str, dict[str, dict[str, str]]] = {}
    paths: list[str] = []
    for name, value in args.items():
        if re.fullmatch(r"path\d+", name):
            paths.append(value)
        elif match := re.fullmatch(r"(domain\d+)class(\d+)(\w+)", name) or re.fullmatch(r"(host|dev)(\d+)_(\w+)", name):
            groups.setdefault(f"{match.group(1)}*", {}).setdefault(match.group(2), {})[match.group(3)] = value
        elif name in ("devids", "tempfile_devids"):
            flat[name] = sorted(value.split(","))
        else:
            flat[name] = value
    for name, members in groups.items():
        flat[name] = sorted(sorted(member.items()) for member in members.values())
    if paths:
        flat["path*"] = sorted(paths)
    return flat


def _paths(args: dict[str, str]) -> set[str]:
    return {value for name, value in args.items() if re.fullmatch(r"path\d+", name)}


@dataclass(frozen=True)
class Divergence:
    """A known difference of the embedded tracker for one exchange, and how the comparison adapts.

    ``mode``: ``"skip"`` (reply read, not compared), ``"prefix"`` (ERR lines equal up to
    ``pattern``), ``"values"`` (values of the names matching ``pattern`` not compared),
    ``"names"`` (names matching ``pattern`` not required), ``"replicated"`` (our get_paths holds
    the transcript's path plus the copies the real tracker had not made yet).
    """

    title: str
    mode: Literal["skip", "prefix", "values", "names", "replicated"]
    reason: str
    pattern: str = ""


class Replayer:
    """Replays exchanges in order against a :class:`DevMogileFS`, collecting every mismatch."""

    def __init__(self, mogile: DevMogileFS, divergences: dict[int, Divergence]) -> None:
        self.mogile = mogile
        self.divergences = divergences
        self.devices = DeviceMap({number: node.port for number, node in enumerate(mogile.nodes, 1)})
        self.setup = LineClient(mogile.tracker_address)
        self.connections: dict[str, LineClient] = {}
        self.mismatches: list[str] = []
        self.compared = 0
        self.last_fid: int | None = None
        self.stopped: int | None = None
        self.current_file = ""

    def close(self) -> None:
        for client in [*self.connections.values(), self.setup]:
            client.close()

    def run(self, exchanges: list[Exchange]) -> None:
        """Replay ``exchanges`` in order; mismatches end up in :attr:`mismatches`."""
        for exchange in exchanges:
            if exchange.file != self.current_file:
                for client in self.connections.values():
                    client.close()
                self.connections, self.current_file = {}, exchange.file
            self._do_notes(exchange)
            if exchange.conn.startswith("tracker"):
                self._tracker_exchange(exchange)
            else:
                self._http_exchange(exchange)

    def _fail(self, exchange: Exchange, message: str) -> None:
        self.mismatches.append(f"#{exchange.n} {exchange.file} [{exchange.title}]: {message}")

    # -- what happened off the wire ------------------------------------------------------------

    def _do_notes(self, exchange: Exchange) -> None:
        for note in exchange.notes:
            if match := re.fullmatch(r"# \(PUT of (\d+) bytes? to (\S+), unrecorded\)", note):
                url = self.devices.map_urls(match.group(2).encode()).decode()
                assert http_request(url, "PUT", b"u" * int(match.group(1))).status == 200, note
            elif match := re.fullmatch(r"# setup \(unrecorded\): stored keys (.+) \(class (\w+)\)", note):
                for key in match.group(1).split():
                    assert upload(self.setup, DOMAIN, key, b"s", match.group(2)) == b"OK \r\n", key
            elif re.fullmatch(r"## \[\d+-byte key\] create_open/PUT/create_close \(unrecorded\).*", note):
                key = decode_args(exchange.sent.split(b" ", 1)[1].rstrip(b"\r\n"))["key"]
                assert upload(self.setup, DOMAIN, key, b"k", "thumb") == b"OK \r\n"
                fid = self.setup.ok("file_info", domain=DOMAIN, key=key)["fid"]
                captured = re.search(r"create_open -> OK fid=(\d+)", "\n".join(exchange.notes))
                if captured and fid != captured.group(1):
                    self._fail(exchange, f"unrecorded setup got fid {fid}, the capture {captured.group(1)}")
            elif match := re.fullmatch(r"# stopped mogstored(\d+).*", note):
                # the capture stopped the node of dev N; here, the node playing dev N for the last upload
                self.stopped = self.devices.of(self.last_fid)[int(match.group(1))]
                self.devices.nodes = dict(self.devices.of(self.last_fid))
                self.mogile.nodes[self.stopped - 1].stop()
                self._await_state(self.stopped, "unreachable")
            elif note.startswith("# restarted") and self.stopped is not None:
                self.mogile.nodes[self.stopped - 1].start()
                self._await_state(self.stopped, "writeable")

    def _await_state(self, devid: int, state: str) -> None:
        devices = eventually(
            lambda: self.setup.ok("get_devices", devid=devid), lambda d: d["dev1_observed_state"] == state
        )
        assert devices["dev1_observed_state"] == state, devices

    # -- tracker exchanges ----------------------------------------------------------------------

    def _tracker_exchange(self, exchange: Exchange) -> None:
        client = self.connections.get(exchange.conn)
        if client is None:
            client = self.connections[exchange.conn] = LineClient(self.mogile.tracker_address)
        client.send(self.devices.map_request(exchange.sent))
        expected_lines = exchange.recv.splitlines(keepends=True)
        if not expected_lines:
            if not client.silent_for(0.3):
                self._fail(exchange, f"expected no reply, got {client.read_line()!r}")
            return
        if expected_lines[-1] == b".\r\n":
            actual_lines = [client.read_line()]
            while actual_lines[-1] != b".\r\n":
                actual_lines.append(client.read_line())
        else:
            actual_lines = client.read_lines(len(expected_lines))
        if exchange.closed and not client.closed_within(2):
            self._fail(exchange, "the connection stayed open")
        divergence = self.divergences.get(exchange.n)
        if divergence is not None:
            assert divergence.title == exchange.title, (exchange.n, divergence.title, exchange.title)
            if divergence.mode == "skip":
                return
        if len(actual_lines) != len(expected_lines):
            self._fail(exchange, f"{len(actual_lines)} reply lines, expected {len(expected_lines)}: {actual_lines!r}")
            return
        for expected, actual in zip(expected_lines, actual_lines, strict=True):
            self._compare_line(exchange, expected, actual, divergence)

    def _compare_line(self, exchange: Exchange, expected: bytes, actual: bytes, divergence: Divergence | None) -> None:
        self.compared += 1
        fid = _fid_in(exchange.sent)
        if expected.startswith(b"OK ") and actual.startswith(b"OK ") and b"create_open" in exchange.sent:
            self._learn(exchange, ok_args(expected), ok_args(actual))
        if not expected.startswith(b"OK "):
            mapped = self.devices.map_err(expected, fid)
            if divergence is not None and divergence.mode == "prefix":
                mapped, actual = (
                    mapped.split(divergence.pattern.encode())[0],
                    actual.split(divergence.pattern.encode())[0],
                )
            if mapped != actual:
                self._fail(exchange, f"expected {mapped!r}, got {actual!r}")
            return
        if not actual.startswith(b"OK "):
            self._fail(exchange, f"expected an OK line, got {actual!r}")
            return
        want, got = self.devices.map_args(ok_args(expected), fid), ok_args(actual)
        if divergence is not None and divergence.mode in ("values", "names"):
            for args in (want, got):
                for name in [name for name in args if re.fullmatch(divergence.pattern, name)]:
                    if divergence.mode == "names":
                        del args[name]
                    else:
                        args[name] = "*"
        want_c, got_c = canonical(want), canonical(got)
        if divergence is not None and divergence.mode == "replicated":
            if not _paths(want) <= _paths(got):
                self._fail(exchange, f"the transcript's path is missing: {got!r}")
            for canonical_args in (want_c, got_c):
                del canonical_args["path*"], canonical_args["paths"]
        if want_c != got_c:
            diff = {
                name: (want_c.get(name), got_c.get(name))
                for name in {*want_c, *got_c}
                if want_c.get(name) != got_c.get(name)
            }
            self._fail(exchange, f"differs (expected, got): {diff!r}")

    def _learn(self, exchange: Exchange, expected: dict[str, str], actual: dict[str, str]) -> None:
        fid = int(actual["fid"])
        self.last_fid = fid
        if self.stopped is not None and not self.mogile.nodes[self.stopped - 1].running:
            self.devices.by_fid[fid] = dict(self.devices.nodes)  # a node is down: the mapping is known
            return
        names = [name for name in expected if re.fullmatch(r"devid(_\d+)?", name)]
        self.devices.learn(fid, [(int(expected[name]), int(actual.get(name, 0))) for name in names])

    # -- HTTP exchanges -------------------------------------------------------------------------

    def _http_exchange(self, exchange: Exchange) -> None:
        request = exchange.sent
        match = _HTTP_PATH.search(request)
        fid = int(match.group(3)) if match and match.group(3) else None
        if match:
            devid = self.devices.of(fid)[int(match.group(2))]
            request = re.sub(rb"(?<= )/dev\d+/", b"/dev%d/" % devid, request)
        else:
            port = int(exchange.conn.rsplit(":", 1)[1])
            devid = self.devices.nodes[TRANSCRIPT_DEVICE_OF_PORT[port]]
        port = self.devices.ports[devid]
        request = re.sub(rb"Host: 127\.0\.0\.1:\d+", b"Host: 127.0.0.1:%d" % port, request)
        if b"If-Modified-Since:" in request:  # the capture's date is the real node's file date
            path = request.split(b" ", 2)[1].decode()
            ours = http_request(f"http://127.0.0.1:{port}{path}", "HEAD").headers["last-modified"]
            request = re.sub(rb"If-Modified-Since: [^\r]+", b"If-Modified-Since: " + ours.encode(), request)
        methods = re.findall(rb"^([A-Z]+) /", request, re.MULTILINE)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            replies, rest = [], b""
            for method in methods:
                reply, rest = read_http_reply(sock, method.decode(), rest)
                replies.append(reply)
        divergence = self.divergences.get(exchange.n)
        if divergence is not None:
            assert (divergence.title, divergence.mode) == (exchange.title, "skip"), exchange.n
            return
        for expected, actual in zip(_split_replies(exchange.recv, methods), replies, strict=True):
            self.compared += 1
            self._compare_http(exchange, expected, actual)

    def _compare_http(self, exchange: Exchange, expected: HTTPReply, actual: HTTPReply) -> None:
        if (expected.version, expected.status, expected.reason) != (actual.version, actual.status, actual.reason):
            self._fail(exchange, f"status {actual.version} {actual.status} {actual.reason}, expected {expected.status}")
        if expected.body != actual.body:
            self._fail(exchange, f"body {actual.body[:80]!r}, expected {expected.body[:80]!r}")
        for name in ("content-type", "content-length", "content-range", "accept-ranges", "connection", "keep-alive"):
            if expected.headers.get(name) != actual.headers.get(name):
                self._fail(exchange, f"{name}: {actual.headers.get(name)!r}, expected {expected.headers.get(name)!r}")
        if ("last-modified" in expected.headers) != ("last-modified" in actual.headers):
            self._fail(exchange, "Last-Modified presence differs")


def _split_replies(recv: bytes, methods: list[bytes]) -> Iterator[HTTPReply]:
    """The responses recorded in ``recv``, parsed as :func:`read_http_reply` parses a socket."""

    class _Recorded:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def settimeout(self, timeout: float | None) -> None:
            pass

        def recv(self, size: int) -> bytes:
            chunk, self.data = self.data[:size], self.data[size:]
            return chunk

    source = _Recorded(recv)
    rest = b""
    for method in methods:
        reply, rest = read_http_reply(source, method.decode(), rest)
        yield reply
