"""The development storage node answers HTTP like mogstored (Perlbal 1.80), per 11-http-mogstored.txt."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration._wire_client import HTTPReply, eventually, http_request, raw_http, read_http_reply

from mogile_middleware.devserver import StorageNode

CONTENT = b"0123456789abcdefghijklmnopqrstuvwxyz\n"  # the 37 bytes of the transcript
FILE = "/dev2/0/000/000/0000000046.fid"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[StorageNode]:
    """A storage node with devices dev1 and dev2, whose docroot holds one 37-byte file at :data:`FILE`."""
    docroot = tmp_path / "stor2"
    target = docroot / FILE.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_bytes(CONTENT)
    (docroot / "dev1").mkdir()
    storage = StorageNode(docroot)
    storage.start()
    yield storage
    storage.stop()


def get(node: StorageNode, path: str = FILE, method: str = "GET", *headers: str) -> HTTPReply:
    """One request on a new connection, with ``Connection: close``."""
    extra = "".join(f"{header}\r\n" for header in headers)
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n{extra}Connection: close\r\n\r\n"
    return raw_http(node.port, request.encode())


def test_get_sends_the_file_with_mogstored_headers(node: StorageNode) -> None:
    reply = get(node)
    assert (reply.version, reply.status, reply.reason) == ("HTTP/1.0", 200, "OK")
    assert reply.body == CONTENT
    assert reply.headers["content-type"] == "text/plain"
    assert reply.headers["content-length"] == "37"
    assert reply.headers["accept-ranges"] == "bytes"
    assert reply.headers["last-modified"].endswith(" GMT")
    assert reply.headers["connection"] == "close"


def test_head_sends_the_headers_only(node: StorageNode) -> None:
    reply = get(node, FILE, "HEAD")
    assert reply.status == 200 and reply.headers["content-length"] == "37" and reply.body == b""


@pytest.mark.parametrize(
    ("range_header", "content_range", "body"),
    [
        ("bytes=0-9", "bytes 0-9/37", CONTENT[:10]),
        ("bytes=10-", "bytes 10-36/37", CONTENT[10:]),
        ("bytes=30-99", "bytes 30-36/37", CONTENT[30:]),
        # mogstored's quirk, reproduced on purpose: a suffix range -N is served as bytes 0..N
        ("bytes=-5", "bytes 0-5/37", CONTENT[:6]),
    ],
)
def test_single_ranges_get_206(node: StorageNode, range_header: str, content_range: str, body: bytes) -> None:
    reply = get(node, FILE, "GET", f"Range: {range_header}")
    assert (reply.status, reply.reason) == (206, "Partial Content")
    assert reply.headers["content-range"] == content_range
    assert reply.headers["content-length"] == str(len(body))
    assert reply.body == body


@pytest.mark.parametrize("range_header", ["bytes=100-200", "bytes=37-", "bytes=9-3", "bytes=-0"])
def test_unsatisfiable_ranges_get_416(node: StorageNode, range_header: str) -> None:
    reply = get(node, FILE, "GET", f"Range: {range_header}")
    assert (reply.status, reply.reason) == (416, "Request range not satisfiable")
    assert reply.headers["content-range"] == "bytes */37"
    assert reply.headers["content-length"] == "0" and reply.body == b""


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-6", "items=0-3", "bytes=-"])
def test_other_ranges_are_ignored(node: StorageNode, range_header: str) -> None:
    reply = get(node, FILE, "GET", f"Range: {range_header}")
    assert reply.status == 200 and reply.body == CONTENT


def test_head_with_range_gets_206_headers(node: StorageNode) -> None:
    reply = get(node, FILE, "HEAD", "Range: bytes=0-9")
    assert reply.status == 206 and reply.headers["content-range"] == "bytes 0-9/37" and reply.body == b""


def test_if_modified_since_equal_to_last_modified_gets_304(node: StorageNode) -> None:
    last_modified = get(node).headers["last-modified"]
    reply = get(node, FILE, "GET", f"If-Modified-Since: {last_modified}")
    assert (reply.status, reply.body) == (304, b"")
    assert reply.headers["last-modified"] == last_modified
    assert get(node, FILE, "GET", "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT").status == 200


def test_missing_file_and_directory(node: StorageNode) -> None:
    missing = get(node, "/dev2/0/000/000/9999999999.fid")
    assert (missing.status, missing.body) == (404, b"<h1>404 - Not Found</h1>\n")
    directory = get(node, "/dev2/0/000/000/")
    assert (directory.status, directory.body) == (200, b"<h1>200 - OK</h1>\nDirectory listing disabled")
    assert get(node, "/dev2/../../etc/passwd").status == 400


def test_put_creates_directories_and_overwrites(node: StorageNode) -> None:
    url = f"{node.url}/dev1/9/999/999/0000000001.fid"
    created = http_request(url, "PUT", b"new content\n")
    assert (created.version, created.status, created.body) == ("HTTP/1.0", 200, b"<h1>200 - OK</h1>\n")
    assert http_request(url).body == b"new content\n"
    assert http_request(url, "PUT", b"overwritten\n").status == 200
    assert http_request(url).body == b"overwritten\n"
    assert not [name for name in os.listdir(node.docroot / "dev1/9/999/999") if name.endswith(".tmp")]


def test_put_chunked_and_without_body(node: StorageNode) -> None:
    chunked = (
        b"PUT /dev1/0/000/000/7777777777.fid HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    )
    assert raw_http(node.port, chunked).status == 200
    assert http_request(f"{node.url}/dev1/0/000/000/7777777777.fid").body == b"hello world"
    empty = b"PUT /dev1/0/000/000/6666666666.fid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert raw_http(node.port, empty).status == 200
    assert http_request(f"{node.url}/dev1/0/000/000/6666666666.fid").headers["content-length"] == "0"


#: A storage node whose files may not grow past 64 KiB (``RLIMIT_FSIZE``: as a full disk, a write
#: error of its own) takes a PUT of 1 MiB.
_NODE_OUT_OF_ROOM = """
import logging, os, resource, signal, socket, sys, time
from mogile_middleware import StorageError
from mogile_middleware.devserver import StorageNode
from mogile_middleware.storage import PutStream
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
os.mkdir(os.path.join(sys.argv[1], "dev1"))
node = StorageNode(sys.argv[1])
node.start()
connection = socket.create_connection(("127.0.0.1", node.port), timeout=10)
connection.sendall(b"PUT /dev1/0/000/000/0000000001.fid HTTP/1.0\\r\\nContent-Length: 1048576\\r\\n\\r\\n")
try:
    connection.sendall(b"x" * (1 << 20))
except OSError:  # the node answered and closed before taking it all
    pass
print(connection.makefile("rb").readline().decode().strip())
# A body the socket's buffers hold whole: the node's answer came before the client ended it.
put = PutStream(f"{node.url}/dev1/0/000/000/0000000002.fid", length=200_000)
put.write(b"x" * 200_000)
time.sleep(0.5)  # the node has answered and closed
try:
    put.finish()
except StorageError as error:
    print(error)
node.stop()
"""


def test_a_put_the_node_has_no_room_for_is_answered_507_and_logged_as_its_failure(tmp_path: Path) -> None:
    """It was logged at DEBUG as a client gone away, and the connection closed without an answer:
    the uploader said "Broken pipe", and nothing said the node's disk was full."""
    process = subprocess.run([sys.executable, "-c", _NODE_OUT_OF_ROOM, str(tmp_path)], capture_output=True,
                             text=True, timeout=60)
    assert process.returncode == 0, process.stderr
    raw, through_the_client = process.stdout.splitlines()
    assert raw == "HTTP/1.0 507 Insufficient Storage"
    assert through_the_client.endswith("/0000000002.fid answered HTTP 507 before taking all of the body")
    assert "WARNING PUT '/dev1/0/000/000/0000000001.fid' not stored: [Errno 27] File too large" in process.stderr
    assert list((tmp_path / "dev1").rglob("*")) == [tmp_path / "dev1/0", tmp_path / "dev1/0/000",
                                                    tmp_path / "dev1/0/000/000"]  # no file, no part left


def test_put_under_a_device_directory_the_node_lacks_is_404(node: StorageNode) -> None:
    """As mogstored (min_put_directory = 1): an unmounted or mistyped device is no place to write."""
    reply = http_request(f"{node.url}/dev99/0/000/000/0000000001.fid", "PUT", b"x")
    assert (reply.status, reply.body) == (404, b"<h1>404 - Not Found</h1>\nBase directory does not exist")
    assert not (node.docroot / "dev99").exists()


def test_put_at_top_level_is_refused(node: StorageNode) -> None:
    reply = http_request(f"{node.url}/toplevel.fid", "PUT", b"x")
    assert (reply.status, reply.reason) == (400, "Bad request")
    assert reply.body == b"<h1>400 - Bad request</h1>\nDoes not meet minimum directory requirement"
    assert not (node.docroot / "toplevel.fid").exists()


def test_delete_and_mkcol(node: StorageNode) -> None:
    url = node.url + FILE
    deleted = http_request(url, "DELETE")
    assert (deleted.status, deleted.body) == (204, b"")
    assert http_request(url, "DELETE").status == 404
    assert http_request(url).status == 404
    assert http_request(f"{node.url}/dev2/newdir/", "MKCOL").status == 400
    # A directory, as mogstored 2.73 answers (it was a 404, as for no file).
    for target, reason in (("/dev2/0/", "Invalid filename"), ("/dev2", "Is a directory")):
        refused = http_request(node.url + target, "DELETE")
        assert (refused.status, refused.body) == (400, f"<h1>400 - Bad request</h1>\n{reason}".encode())
    assert (node.docroot / "dev2/0").is_dir()


def test_keep_alive_serves_pipelined_requests_on_one_connection(node: StorageNode) -> None:
    request = f"GET {FILE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(request * 2)
        first, rest = read_http_reply(sock, "GET")
        second, _ = read_http_reply(sock, "GET", rest)
        for reply in (first, second):
            assert (reply.version, reply.status, reply.body) == ("HTTP/1.0", 200, CONTENT)
            assert reply.headers["connection"] == "keep-alive"
            assert reply.headers["keep-alive"] == "timeout=30, max=100"
        sock.sendall(b"PUT /dev2/x/y.fid HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + request)
        put, rest = read_http_reply(sock, "PUT")
        third, _ = read_http_reply(sock, "GET", rest)
        assert (put.status, third.body) == (200, CONTENT)


def test_http_client_reuses_its_connection(node: StorageNode) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        bodies, sockets = [], set()
        for method in ("GET", "HEAD", "PUT", "GET"):
            conn.request(method, FILE, body=CONTENT if method == "PUT" else None)
            bodies.append(conn.getresponse().read())
            sockets.add(id(conn.sock))
        assert bodies == [CONTENT, b"", b"<h1>200 - OK</h1>\n", CONTENT] and len(sockets) == 1
    finally:
        conn.close()


def test_http_1_0_closes_unless_keep_alive_is_asked(node: StorageNode) -> None:
    plain = raw_http(node.port, f"GET {FILE} HTTP/1.0\r\n\r\n".encode())
    assert plain.headers["connection"] == "close"
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(f"GET {FILE} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode() * 2)
        first, rest = read_http_reply(sock, "GET")
        second, _ = read_http_reply(sock, "GET", rest)
        assert first.headers["connection"] == "keep-alive" and second.body == CONTENT


def test_a_put_of_a_negative_length_is_refused_as_mogstored_refuses_it(node: StorageNode) -> None:
    # It stored an empty file (200). mogstored 2.73: "400 Bad request", the length named.
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"PUT /dev2/0/000/000/0000000098.fid HTTP/1.0\r\nContent-Length: -1\r\n\r\n")
        reply, _ = read_http_reply(sock, "PUT")
    assert (reply.status, reply.body) == (400, b"<h1>400 - Bad request</h1>\nContent-length of -1 is invalid.")
    assert not (node.docroot / "dev2/0/000/000/0000000098.fid").exists()


def test_a_put_cut_midway_leaves_no_file(node: StorageNode) -> None:
    target = node.docroot / "dev2/0/000/000/0000000099.fid"
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"PUT /dev2/0/000/000/0000000099.fid HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        sock.sendall(b"x" * 50000)
    leftovers = eventually(lambda: os.listdir(target.parent), lambda names: len(names) == 1)
    assert leftovers == ["0000000046.fid"] and not target.exists()


def test_large_files_stream_through(node: StorageNode) -> None:
    data = os.urandom(1 << 16) * 160  # 10 MiB
    url = f"{node.url}/dev2/0/000/001/0000001000.fid"
    assert http_request(url, "PUT", data).status == 200
    reply = http_request(url)
    assert reply.headers["content-length"] == str(len(data)) and reply.body == data
    tail = http_request(url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert tail.status == 206 and tail.body == data[-10:]


def test_stop_makes_the_node_unreachable_and_start_brings_it_back(node: StorageNode) -> None:
    port = node.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
        kept.sendall(f"GET {FILE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        read_http_reply(kept, "GET")
        node.stop()
        kept.settimeout(5)
        assert kept.recv(1) == b""  # the kept-alive connection was cut too
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    started = time.monotonic()
    node.start()
    assert node.port == port and time.monotonic() - started < 2
    assert http_request(node.url + FILE).body == CONTENT
