"""Raw-socket building blocks for the development MogileFS tests: a line client and a tiny HTTP client.

Deliberately independent of the package's own tracker client, so the tests see the bytes.
"""

from __future__ import annotations

import http.client
import select
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import quote, urlsplit

from mogile_middleware.protocol import ArgValue, decode_args, encode_request

T = TypeVar("T")


class LineClient:
    """One TCP connection to a tracker, read and written as raw bytes."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.timeout = timeout
        self._pending = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        """The next line, terminator included (raises on EOF or timeout)."""
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._pending:
            chunk = self._recv(deadline - time.monotonic())
            if not chunk:
                raise ConnectionError(f"connection closed; partial line {self._pending[:80]!r}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line + b"\n"

    def read_lines(self, count: int) -> list[bytes]:
        """The next ``count`` lines."""
        return [self.read_line() for _ in range(count)]

    def ask(self, line: bytes | str) -> bytes:
        """Send one line (CRLF added) and return the reply line."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.read_line()

    def call(self, command: str, **args: ArgValue) -> bytes:
        """Send a properly encoded request and return the reply line."""
        self.send(encode_request(command, args))
        return self.read_line()

    def ok(self, command: str, **args: ArgValue) -> dict[str, str]:
        """Send a request that must succeed; its OK arguments."""
        reply = self.call(command, **args)
        assert reply.startswith(b"OK "), (command, args, reply)
        return decode_args(reply[3:].rstrip(b"\r\n"))

    def silent_for(self, seconds: float = 0.3) -> bool:
        """True when nothing at all arrives during ``seconds``."""
        if self._pending:
            return False
        ready, _, _ = select.select([self.sock], [], [], seconds)
        return not ready

    def closed_within(self, seconds: float) -> bool:
        """True when the server closes the connection within ``seconds`` (data before EOF is dropped)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                if not self._recv(remaining):
                    return True
            except TimeoutError:
                return False
        return False

    def _recv(self, remaining: float) -> bytes:
        self.sock.settimeout(max(remaining, 0.001))
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""


class Receiver(Protocol):
    """What :func:`read_http_reply` reads from: a socket, or recorded bytes posing as one."""

    def settimeout(self, value: float | None, /) -> None: ...

    def recv(self, bufsize: int, /) -> bytes: ...


@dataclass
class HTTPReply:
    """A parsed HTTP response: status code, reason, headers (lower-cased names) and body.

    ``fields`` keeps every header line in order, repeated names included.
    """

    status: int
    reason: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    fields: list[tuple[str, str]] = field(default_factory=list)


def read_http_reply(
    sock: Receiver, method: str, pending: bytes = b"", timeout: float = 10.0
) -> tuple[HTTPReply, bytes]:
    """Read one response from ``sock`` (plus bytes already read); returns it and the bytes after it."""
    sock.settimeout(timeout)
    data = pending
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed inside the response head: {data[:200]!r}")
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, reason = [*status_line.split(" ", 2), ""][:3]
    fields = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in header_lines)]
    reply = HTTPReply(int(status), reason, version, dict(fields), fields=fields)
    headers = reply.headers
    if method == "HEAD" or reply.status in (204, 304):
        return reply, data
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(data) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            data += chunk
        reply.body, data = data[:length], data[length:]
        return reply, data
    while chunk := sock.recv(65536):
        data += chunk
    reply.body = data
    return reply, b""


def raw_http(port: int, request: bytes, method: str | None = None, host: str = "127.0.0.1") -> HTTPReply:
    """Send raw request bytes on a new connection and read one response."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        reply, _ = read_http_reply(sock, method or request.split(b" ", 1)[0].decode())
    return reply


def http_request(
    url: str, method: str = "GET", body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> HTTPReply:
    """One request with http.client (connection closed afterwards)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, parts.path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return HTTPReply(
            response.status,
            response.reason,
            f"HTTP/{response.version / 10:.1f}",
            {name.lower(): value for name, value in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upload(
    client: LineClient, domain: str, key: str, data: bytes, cls: str | None = None, **close_args: ArgValue
) -> bytes:
    """create_open, PUT (http.client) and create_close; returns the create_close reply line."""
    opened = client.ok("create_open", domain=domain, key=key, **({"class": cls} if cls else {}))
    put = http_request(opened["path"], "PUT", data)
    assert put.status == 200, put
    args: dict[str, ArgValue] = {"domain": domain, "key": key, "fid": opened["fid"], "devid": opened["devid"]}
    args.update(path=opened["path"], size=len(data))
    args.update(close_args)
    return client.call("create_close", **args)


def paths_of(reply: bytes) -> list[str]:
    """The URLs of a get_paths reply, in reply order."""
    args = decode_args(reply[3:].rstrip(b"\r\n"))
    return [args[f"path{number}"] for number in range(1, int(args["paths"]) + 1)]


def eventually(probe: Callable[[], T], accept: Callable[[T], bool], timeout: float = 3.0, every: float = 0.05) -> T:
    """Call ``probe`` until ``accept`` likes its result (returned) or ``timeout`` passes (last result)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if accept(result) or time.monotonic() >= deadline:
            return result
        time.sleep(every)


def quoted(url: str) -> str:
    """A URL percent-encoded the way clients send the create_close path."""
    return quote(url, safe="")
