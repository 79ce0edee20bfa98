"""How the development tracker talks to storage nodes: only HTTP (HEAD, GET, PUT, DELETE).

Nothing here touches the filesystem, so any node speaking mogstored's HTTP (the bundled
:class:`~mogile_middleware.devserver.storage_node.StorageNode`, or a real Perlbal/mogstored
docroot with PUT and DELETE enabled) can be registered as a device.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from urllib.parse import urlsplit

from .netutil import CHUNK_SIZE

log = logging.getLogger(__name__)

#: Seconds to wait for a storage node to connect or answer.
TIMEOUT = 10.0


class StorageHTTPError(Exception):
    """A storage node could not be reached or refused a request."""


@contextmanager
def _request(
    method: str, url: str, headers: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> Iterator[http.client.HTTPConnection]:
    """An open connection with ``method url`` sent (headers only); closed afterwards."""
    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    except ValueError as exc:  # a host registered with a port that is no port
        raise StorageHTTPError(f"{method} {url}: {exc}") from exc
    try:
        conn.putrequest(method, parts.path or "/", skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.putheader("Connection", "close")
        conn.endheaders()
        yield conn
    except (OSError, http.client.HTTPException) as exc:
        raise StorageHTTPError(f"{method} {url}: {exc}") from exc
    finally:
        conn.close()


def _answer(method: str, url: str) -> http.client.HTTPResponse | None:
    """The node's (read) answer to a body-less ``method url``; ``None`` when it cannot be reached."""
    try:
        with _request(method, url) as conn:
            response = conn.getresponse()
            response.read()
            return response
    except StorageHTTPError as exc:
        log.debug("%r", exc)
        return None


def fetch(url: str, timeout: float, limit: int = 64 * 1024) -> tuple[int, bytes] | None:
    """Status and body (at most ``limit`` bytes) of a GET of a small file; ``None`` when unreachable."""
    try:
        with _request("GET", url, timeout=timeout) as conn:
            response = conn.getresponse()
            return response.status, response.read(limit)
    except (StorageHTTPError, OSError, http.client.HTTPException) as exc:
        log.debug("GET %s: %r", url, exc)
        return None


def head_size(url: str) -> int | None:
    """The size of the file at ``url``; ``-1`` when the node says it is missing, ``None`` when unreachable."""
    response = _answer("HEAD", url)
    if response is None:
        return None
    if response.status == 404:
        return -1
    length = response.getheader("Content-Length")
    if response.status != 200 or length is None or not length.isdigit():
        return None
    return int(length)


def delete(url: str) -> bool:
    """Delete the file at ``url``; ``True`` when it is gone (deleted now or already missing)."""
    response = _answer("DELETE", url)
    return response is not None and response.status in (200, 204, 404)


def md5_hex(url: str) -> str:
    """The MD5 of the file at ``url``, read as a stream."""
    digest = hashlib.md5()
    with closing(_stream(url)) as chunks:
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


def copy(source_url: str, target_url: str, length: int) -> str:
    """Stream the file at ``source_url`` into a PUT to ``target_url``; returns the MD5 of what was sent.

    Never holds more than one chunk in memory. Raises :class:`StorageHTTPError` on any failure.
    """
    digest = hashlib.md5()
    sent = 0
    with _request("PUT", target_url, {"Content-Length": str(length)}) as target, closing(_stream(source_url)) as chunks:
        for chunk in chunks:
            if sent + len(chunk) > length:
                raise StorageHTTPError(f"{source_url} is longer than {length} bytes")
            target.send(chunk)
            digest.update(chunk)
            sent += len(chunk)
        if sent != length:
            raise StorageHTTPError(f"{source_url} gave {sent} bytes, expected {length}")
        response = target.getresponse()
        response.read()
    if response.status not in (200, 201, 204):
        raise StorageHTTPError(f"PUT {target_url}: HTTP {response.status}")
    return digest.hexdigest()


def _stream(url: str) -> Generator[bytes, None, None]:
    with _request("GET", url) as conn:
        response = conn.getresponse()
        if response.status != 200:
            raise StorageHTTPError(f"GET {url}: HTTP {response.status}")
        while chunk := response.read(CHUNK_SIZE):
            yield chunk
