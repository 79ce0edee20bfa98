"""The upload helper against the embedded MogileFS: sources, classes, checksums, failures; the same
promises from the asyncio client's ``store_content`` and ``store_file``."""

from __future__ import annotations

import array
import errno
import gc
import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import mmap
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from conftest import DOMAIN
from integration._async_facade import Flavour, both_flavours, flavour  # noqa: F401 (a fixture)
from integration._slow_clients import node_connections
from wiretools import CountingRelay, LoopbackServer, PatternFile, ScriptedTracker, SilentServer, pattern_md5

from mogile_middleware import (
    Admin,
    AsyncClient,
    Client,
    MemoryCache,
    StorageError,
    UnknownKeyError,
    UnregClassError,
    UploadError,
    UploadOutcomeUnknownError,
)
from mogile_middleware.cache import entry_key
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.tracker import TrackerConnection
from mogile_middleware.upload import Uploader

MIB = 1024 * 1024


@pytest.fixture
def client(devmogile: DevMogileFS, flavour: Flavour) -> Client:
    Admin(devmogile.trackers).create_class(DOMAIN, "original", 2, hashtype="MD5")
    return flavour.Client(DOMAIN, devmogile.trackers)


def store(flavour: Flavour, client: Client, key: str, source: bytes | BinaryIO | Iterable[bytes], cls: str,
          **options: object) -> int:
    """An :class:`Uploader` upload with the blocking client; ``store_content`` or ``store_file``
    (chunks as an async iterator) with the asyncio one, which takes no ``options``."""
    if flavour.name == "sync":
        return Uploader(client).upload(key, source, cls, **options)  # type: ignore[arg-type]
    if isinstance(source, bytes):
        return client.store_content(key, source, cls)
    return client.store_file(key, source if hasattr(source, "read") else _async_chunks(source), cls)


async def _async_chunks(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@both_flavours
def test_64_mib_with_a_class_streams_in_flat_memory(flavour: Flavour, client: Client) -> None:
    seen: list[int] = []
    progress = {"progress": seen.append} if flavour.name == "sync" else {}
    tracemalloc.start()
    try:
        stored = store(flavour, client, "video.bin", PatternFile(64 * MIB), "original", **progress)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored == 64 * MIB
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB of Python allocations"
    info = client.file_info("video.bin")
    assert (info.cls, info.length, info.devcount) == ("original", 64 * MIB, 2)
    assert info.checksum == f"MD5:{pattern_md5(64 * MIB)}"
    if progress:
        assert seen[-1] == 64 * MIB and seen == sorted(seen) and len(seen) > 100


_UPLOAD_AS_THE_MAIN_THREAD_ENDS = """
import sys, threading, time
from mogile_middleware import Client, Uploader

def pieces():
    for _ in range(8):
        time.sleep(0.05)  # a source that trickles: a socket, a pipe
        yield bytes(range(256)) * 4096

def upload():
    Uploader(Client(sys.argv[1], sys.argv[2:])).upload("late.bin", pieces(), cls="original")
    print("stored")

threading.Thread(target=upload).start()
"""


def test_an_upload_in_a_thread_goes_on_as_the_main_thread_ends(devmogile: DevMogileFS, client: Client) -> None:
    # Python waits for the thread, but no longer takes work on its thread pools: the MD5 of each
    # piece, handed to one, raised RuntimeError (a worker's uploads in flight as gunicorn stops it).
    done = subprocess.run([sys.executable, "-c", _UPLOAD_AS_THE_MAIN_THREAD_ENDS, DOMAIN, *devmogile.trackers],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "stored\n", "")
    data = bytes(range(256)) * 4096 * 8
    assert Client(DOMAIN, devmogile.trackers).file_info("late.bin").checksum == f"MD5:{hashlib.md5(data).hexdigest()}"


@pytest.mark.parametrize(
    "make_source",
    [
        pytest.param(lambda data, tmp: data, id="bytes"),
        pytest.param(lambda data, tmp: bytearray(data), id="bytearray"),
        pytest.param(lambda data, tmp: memoryview(array.array("i", data)), id="memoryview-of-ints"),
        pytest.param(lambda data, tmp: _written(tmp / "file.bin", data), id="path-str"),
        pytest.param(lambda data, tmp: Path(_written(tmp / "file.bin", data)), id="pathlike"),
        pytest.param(lambda data, tmp: io.BytesIO(data), id="file-object"),
        pytest.param(lambda data, tmp: iter([data[:1000], data[1000:]]), id="chunks"),
    ],
)
def test_every_kind_of_source(client: Client, tmp_path: Path, make_source) -> None:
    data = bytes(range(256)) * 100
    assert Uploader(client).upload("doc", make_source(data, tmp_path), cls="thumb") == len(data)
    assert client.get_file_data("doc") == data
    assert client.file_info("doc").cls == "thumb"


@pytest.mark.parametrize("source", [
    pytest.param(lambda tmp: io.StringIO("text"), id="text-file"),
    pytest.param(lambda tmp: open(_written(tmp / "t.txt", b"t")), id="file-in-text-mode"),
    pytest.param(lambda tmp: 12345, id="number"),
])
def test_a_source_of_another_kind_is_refused_naming_it_and_the_key_keeps_its_data(client: Client, tmp_path: Path,
                                                                                   source) -> None:
    client.store_content("doc", b"old", cls="thumb")
    given = source(tmp_path)
    with pytest.raises(TypeError, match=f"'doc'.*not {type(given).__name__}"):
        Uploader(client).upload("doc", given, cls="thumb")
    if hasattr(given, "close"):
        given.close()
    assert client.get_file_data("doc") == b"old"


def test_a_wsgi_body_cut_short_is_refused_when_its_announced_length_is_given(devmogile: DevMogileFS) -> None:
    """The README's recipe for a request body: gunicorn's ``wsgi.input`` of a client that left
    reads short, then ``b""``, with no error; given the request's length, the upload refuses it."""
    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import IterUnreader

    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("avatar.png", b"the old picture", cls="thumb")

    def left_midway() -> Body:
        return Body(LengthReader(IterUnreader([b"x" * 50_000]), 100_000))  # Content-Length: 100000

    with pytest.raises(UploadError, match="50000 of the 100000 bytes announced"):
        with client.new_file("avatar.png", cls="thumb", size=100_000) as upload:
            upload.write_from(left_midway())
    # store_file takes the length too, as AsyncClient's does: without it, half the picture was stored.
    with pytest.raises(UploadError, match="50000 of the 100000 bytes announced"):
        client.store_file("avatar.png", left_midway(), cls="thumb", size=100_000)
    assert client.get_file_data("avatar.png") == b"the old picture"
    assert client.store_file("whole.png", left_midway(), cls="thumb", size=50_000) == 50_000


def test_bytes_or_a_file_other_than_the_size_given_to_store_file_are_refused_before_the_tracker_is_asked() -> None:
    client = Client(DOMAIN, ["127.0.0.1:1"])  # nobody there: asking would be a TrackerUnavailableError
    with pytest.raises(ValueError, match=r"size=5 announced for 'avatar.png', but the content holds 3 bytes"):
        client.store_file("avatar.png", b"abc", size=5)
    longer = io.BytesIO(b"0123456789")
    longer.seek(2)
    with pytest.raises(ValueError, match=r"size=5 announced for 'avatar.png', but the file holds 8 bytes from where"):
        client.store_file("avatar.png", longer, size=5)


def test_a_stream_given_its_size_is_read_no_further(client: Client) -> None:
    """wsgiref's ``wsgi.input`` is the client's socket, which PEP 3333 forbids reading past
    ``CONTENT_LENGTH``: the upload waited there for bytes the client, awaiting its answer, never sent."""
    ours, clients = socket.socketpair()
    with ours, clients, ours.makefile("rb") as body:
        clients.sendall(b"0123456789" + b"the next request")  # and the client waits for its answer
        ours.settimeout(10)  # a read past the body would wait for more, then fail the test
        assert client.store_file("body.bin", body, cls="thumb", size=10) == 10
        assert body.read(16) == b"the next request"
    assert client.get_file_data("body.bin") == b"0123456789"


@pytest.mark.parametrize(("sent", "refused"), [(50_000, "50000 of the 100000 bytes announced"),
                                               (150_000, "more than the 100000 bytes announced")])
def test_an_asgi_body_other_than_its_announced_length_is_refused_when_given(devmogile: DevMogileFS, sent: int,
                                                                            refused: str) -> None:
    """A raw ASGI app's receive loop ending at ``http.disconnect`` gives a body cut short, no error."""
    async def body() -> AsyncIterator[bytes]:
        for _ in range(sent // 10_000):
            yield b"x" * 10_000

    async def upload() -> bytes:
        client = AsyncClient(DOMAIN, devmogile.trackers)
        try:
            await client.store_content("avatar.png", b"the old picture", cls="thumb")
            with pytest.raises(UploadError, match=refused):
                await client.store_file("avatar.png", body(), cls="thumb", size=100_000)
            assert await client.store_file("whole.png", body(), cls="thumb", size=sent) == sent
            return await client.get_file_data("avatar.png")
        finally:
            await client.aclose()

    assert asyncio.run(upload()) == b"the old picture"


def test_the_readmes_asgi_receive_loop_keeps_the_key_when_a_chunked_upload_is_cut_short(devmogile: DevMogileFS) -> None:
    """uvicorn's messages for a chunked PUT whose client left mid-chunk: no length to hold the body
    to, so the README's loop raises at ``http.disconnect``; one that just ended there stored the
    66,536 bytes that came over the old file."""
    messages = [{"type": "http.request", "body": b"A" * 65_536, "more_body": True},
                {"type": "http.request", "body": b"A" * 1_000, "more_body": True}, {"type": "http.disconnect"}]

    async def upload(raising: bool) -> bytes:
        pending = iter(messages)
        client = AsyncClient(DOMAIN, devmogile.trackers)

        async def receive() -> dict[str, object]:
            return next(pending)

        async def body() -> AsyncIterator[bytes]:  # the README's, but for the loop that just ends
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not raising:
                        return
                    raise ConnectionResetError("the client left during the upload")
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        try:
            await client.store_content("avatar.png", b"the old picture", cls="thumb")
            headers = [(b"transfer-encoding", b"chunked")]  # scope["headers"]
            length = dict(headers).get(b"content-length")
            try:
                await client.store_file("avatar.png", body(), cls="thumb", size=int(length) if length else None)
            except ConnectionResetError:
                pass
            return await client.get_file_data("avatar.png")
        finally:
            await client.aclose()

    assert asyncio.run(upload(raising=True)) == b"the old picture"
    assert asyncio.run(upload(raising=False)) == b"A" * 66_536


@pytest.mark.parametrize("content", [b"abc", bytearray(b"abc"), memoryview(b"xabcx")[1:4]])
def test_bytes_other_than_the_announced_size_are_refused_before_the_tracker_is_asked(
        devmogile: DevMogileFS, content: bytes | bytearray | memoryview) -> None:
    """Bytes tell their length: no fid is reserved for an upload that cannot match it."""
    upstream = TrackerConnection(devmogile.tracker_address, 1.0, 5.0)
    asked: list[bytes] = []

    def recorded(line: bytes) -> bytes:
        asked.append(line.split(b" ")[0])
        return upstream.roundtrip(line)

    async def upload(client: AsyncClient) -> bytes:
        try:
            with pytest.raises(ValueError, match=r"size=5 announced for 'avatar.png', but the content holds 3 bytes"):
                await client.store_file("avatar.png", content, cls="thumb", size=5)
            assert asked == []
            assert await client.store_file("avatar.png", content, cls="thumb", size=3) == 3
            return await client.get_file_data("avatar.png")
        finally:
            await client.aclose()

    relay = ScriptedTracker(recorded)
    try:
        assert asyncio.run(upload(AsyncClient(DOMAIN, [relay.tracker]))) == b"abc"
    finally:
        relay.stop()
        upstream.close()
    assert asked.count(b"create_open") == 1


def test_a_new_file_written_text_is_a_type_error_and_the_bytes_around_it_go_through(client: Client) -> None:
    with client.new_file("doc", cls="thumb") as file:
        file.write(b"bytes, ")
        with pytest.raises(TypeError, match="upload of 'doc' takes bytes, not str"):
            file.write("text")
        file.write(b"more bytes")
    assert client.get_file_data("doc") == b"bytes, more bytes"


def test_a_new_file_refuses_reads_as_a_file_opened_for_writing_does(client: Client) -> None:
    with client.new_file("doc", cls="thumb") as file:
        file.write(b"written")
        for read in (file.read, file.readline, lambda: file.readinto(bytearray(4))):
            with pytest.raises(io.UnsupportedOperation, match="read of 'doc', a new file"):
                read()  # NotImplementedError, which no caller of a file expects
        file.write(b" whole")
    assert client.get_file_data("doc") == b"written whole"


@both_flavours
def test_store_content_takes_bytes_and_never_text_for_a_path(flavour: Flavour, client: Client,
                                                             tmp_path: Path) -> None:
    secret = _written(tmp_path / "secret.txt", b"a local file's bytes")
    for data in (secret, 42):
        with pytest.raises(TypeError, match="store_content of 'notes.txt' takes bytes"):
            client.store_content("notes.txt", data, cls="thumb")  # type: ignore[arg-type]
    with pytest.raises(UnknownKeyError):
        client.file_info("notes.txt")


def _written(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_the_tracker_verifies_checksums_where_the_class_keeps_them(client: Client, devmogile: DevMogileFS) -> None:
    requests: list[str] = []
    real_request = client.pool.request

    def recording(command, args=None, *more):
        requests.append(command + " " + " ".join(f"{k}={v}" for k, v in (args or {}).items() if v is not None))
        return real_request(command, args, *more)

    client.pool.request = recording  # type: ignore[method-assign]
    uploader = Uploader(client)
    uploader.upload("kept", b"with checksum", cls="original")
    uploader.upload("plain", b"always", cls="thumb")
    Uploader(client, checksums="kept").upload("skipped", b"without", cls="thumb")
    # Asked for one upload: whatever the class, as mogilefsd checks it (it was dropped for "thumb").
    client.store_file("asked", b"asked for", cls="thumb", verify_checksum=True)
    asking = Uploader(client, checksums="kept", verify_checksums=False)
    asking.upload("asked too", b"asked", cls="thumb", verify_checksum=True)
    client.store_file("asked so", b"asked so", cls="thumb", verify_checksum=1)  # type: ignore[arg-type] # as AsyncClient
    closes = [line for line in requests if line.startswith("create_close")]
    assert f"checksum=MD5:{hashlib.md5(b'asked for').hexdigest()} checksumverify=1" in closes[3]
    assert f"checksum=MD5:{hashlib.md5(b'asked').hexdigest()} checksumverify=1" in closes[4]
    assert f"checksum=MD5:{hashlib.md5(b'asked so').hexdigest()} checksumverify=1" in closes[5]
    assert f"checksum=MD5:{hashlib.md5(b'with checksum').hexdigest()} checksumverify=1" in closes[0]
    assert f"checksum=MD5:{hashlib.md5(b'always').hexdigest()}" in closes[1] and "checksumverify" not in closes[1]
    # checksums="kept": a class that keeps no checksum gets none (the tracker would drop it).
    assert "checksum" not in closes[2] and "size=7" in closes[2]
    assert sum(line.startswith("get_domains") for line in requests) == 2


def test_a_large_upload_hashed_beside_its_sending_passes_the_trackers_check(client: Client) -> None:
    data = os.urandom(5 * 1024 * 1024 + 12345)  # several pieces for the hashing thread, and a tail
    assert Uploader(client).upload("large", io.BytesIO(data), cls="original") == len(data)
    assert client.file_info("large").checksum == f"MD5:{hashlib.md5(data).hexdigest()}"
    assert client.read_file("large").read() == data


@both_flavours
def test_an_unknown_class_names_the_class_and_the_domain(flavour: Flavour, client: Client) -> None:
    with pytest.raises(UnregClassError, match="'portrait'.*'testdom'"):
        store(flavour, client, "k", b"x", "portrait")


@both_flavours
def test_a_buffer_is_the_callers_again_once_its_upload_failed(flavour: Flavour, client: Client) -> None:
    """Read where it is, through a view that outlived a failed upload in the error's frames: a
    bytearray could not grow while the error was kept, nor an mmap be closed."""
    data = bytearray(b"x" * 1000)
    with pytest.raises(UnregClassError):
        if flavour.name == "sync":
            Uploader(client).upload("k", data, "portrait")
        else:
            client.store_file("k", data, "portrait")
    data.extend(b"more")  # the error is still kept, with its traceback
    with mmap.mmap(-1, 4) as mapped, memoryview(mapped) as view, pytest.raises(UnregClassError):
        if flavour.name == "sync":
            Uploader(client).upload("k", view, "portrait")
        else:
            client.store_content("k", view, "portrait")


@both_flavours
def test_storage_nodes_dying_midway_leave_no_key(flavour: Flavour, client: Client, devmogile: DevMogileFS) -> None:
    def chunks():
        yield b"a" * MIB
        for node in devmogile.nodes:
            node.stop()
        for _ in range(16):
            yield b"b" * MIB

    with pytest.raises(UploadError):
        store(flavour, client, "half", chunks(), "thumb")
    for node in devmogile.nodes:
        node.start()
    with pytest.raises(UnknownKeyError):
        client.file_info("half")


@both_flavours
def test_a_tracker_gone_during_the_put_leaves_the_upload_to_another(flavour: Flavour, devmogile: DevMogileFS) -> None:
    """Two tracker addresses in front of one tracker, as two mogilefsd share one database: the
    one that answered ``create_open`` goes away during the PUT (a restart), the other closes the
    upload."""
    first, second = CountingRelay(devmogile.tracker_address), CountingRelay(devmogile.tracker_address)
    client = flavour.Client(DOMAIN, [first.tracker, second.tracker])

    def chunks() -> Iterator[bytes]:
        yield b"a" * MIB
        first.stop()
        yield b"b" * MIB

    try:
        assert store(flavour, client, "restarted", chunks(), "thumb") == 2 * MIB
        assert client.get_file_data("restarted") == b"a" * MIB + b"b" * MIB
    finally:
        client.close()
        second.stop()


class _ShortFile(io.RawIOBase):
    """A seekable file that says it holds 3000 bytes from where it is and gives 1000 (or, as
    another ``_LongFile``, says 1000 and gives 3000); ``reads_from_start`` counts its readings."""

    said, holds = 3000, 1000

    def __init__(self) -> None:
        super().__init__()
        self.position = 0
        self.reads_from_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = self.said if whence == io.SEEK_END else offset
        return self.position

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        size = max(0, min(len(buffer), self.holds - self.position))
        buffer[:size] = b"x" * size
        self.reads_from_start += self.position == 0 and size > 0
        self.position += size
        return size


class _LongFile(_ShortFile):
    said, holds = 1000, 3000


@both_flavours
def test_a_file_shorter_or_longer_than_its_size_fails_naming_it_and_the_key_keeps_its_data(
        flavour: Flavour, client: Client) -> None:
    """The node would wait for the rest until storage_timeout: the PUT is dropped at once instead,
    and the error names the source, not the node, as the cause (a file that changed size while read)."""
    store(flavour, client, "doc", b"old", "thumb")
    for source, problem in ((_ShortFile(), "the source ended after 1000 of the 3000 bytes announced"),
                            (_LongFile(), "the source gave more than the 1000 bytes announced")):
        with pytest.raises(UploadError, match=problem):
            store(flavour, client, "doc", source, "thumb")
        assert source.reads_from_start == 1  # the source's fault: no other node is tried
    assert client.get_file_data("doc") == b"old"


class _OnlyRead:
    """A source with nothing but ``read``, as some wrappers of sockets and archives are."""

    def __init__(self, data: bytes) -> None:
        self._rest = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._rest.read(size)


@both_flavours
def test_a_source_with_only_read_is_sent_once(flavour: Flavour, client: Client) -> None:
    data = os.urandom(200_000)
    assert store(flavour, client, "read-only", _OnlyRead(data), "thumb") == len(data)  # type: ignore[arg-type]
    assert client.get_file_data("read-only") == data


@both_flavours
def test_a_file_positioned_past_its_end_stores_nothing_left_in_it(flavour: Flavour, client: Client) -> None:
    # Its size was announced as -7 (Content-Length: -7 to the node), and the upload failed.
    source = io.BytesIO(b"abc")
    source.seek(10)
    assert store(flavour, client, "past-the-end", source, "thumb") == 0
    assert client.get_file_data("past-the-end") == b""


class _SeekAnswersNone(io.BytesIO):
    """A file whose ``seek`` returns None, as paramiko's ``SFTPFile`` and many a wrapper's does."""

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> None:  # type: ignore[override]
        super().seek(offset, whence)


@both_flavours
def test_a_file_whose_seek_returns_nothing_is_stored_whole(flavour: Flavour, client: Client) -> None:
    """Its size was read from seek()'s answer: a TypeError, and nothing stored."""
    source = _SeekAnswersNone(b"header,rows\n" * 1000)
    source.seek(7)
    assert store(flavour, client, "sftp.csv", source, "thumb") == 12_000 - 7
    assert client.get_file_data("sftp.csv") == (b"header,rows\n" * 1000)[7:]


@pytest.mark.parametrize("size", [-1, 3.0, True, "3"])
def test_a_size_that_is_no_count_of_bytes_is_refused_before_the_tracker_is_asked(size: object) -> None:
    client = Client(DOMAIN, ["127.0.0.1:1"])  # nobody there: asking would be a TrackerUnavailableError
    with pytest.raises(ValueError, match=f"size must be a whole number of bytes >= 0.*not {re.escape(repr(size))}"):
        client.new_file("sized", size=size)  # type: ignore[arg-type]


def test_a_new_file_takes_no_more_bytes_once_write_from_sent_the_body(client: Client) -> None:
    with client.new_file("doc", cls="thumb") as file:
        file.write_from(io.BytesIO(b"whole"))
        for more in (lambda: file.write(b"more"), lambda: file.write_from(io.BytesIO(b"more"))):
            with pytest.raises(ValueError, match="write_from sent the whole body"):
                more()
    assert client.get_file_data("doc") == b"whole"


def test_bytes_written_before_write_from_are_never_dropped_on_another_node(devmogile: DevMogileFS) -> None:
    """write() then write_from(), the first node silent: only write_from's bytes could be sent to
    the next node, so the upload fails, and the key keeps its data (it held the rest alone)."""
    upstream = TrackerConnection(devmogile.tracker_address, 1.0, 5.0)
    silent = SilentServer()

    def first_node_silent(line: bytes) -> bytes:
        reply = upstream.roundtrip(line)
        if line.startswith(b"create_open"):
            reply = re.sub(rb"path_1=[^&\r]*", f"path_1=http://127.0.0.1:{silent.port}/dev1/0.fid".encode(), reply)
        return reply

    relay = ScriptedTracker(first_node_silent)
    try:
        Client(DOMAIN, devmogile.trackers).store_content("mixed", b"old data", "avatar")
        upload = Client(DOMAIN, [relay.tracker], storage_timeout=0.5).new_file("mixed", "avatar")
        upload.write(b"header,")
        with pytest.raises(UploadError, match="'mixed'"):
            upload.write_from(io.BytesIO(b"body"))
    finally:
        relay.stop()
        silent.stop()
        upstream.close()
    assert Client(DOMAIN, devmogile.trackers).get_file_data("mixed") == b"old data"


class _SteadyNode(LoopbackServer):
    """A storage node taking the first ``slow_bytes`` of a PUT's body at ``rate`` bytes/s through a
    small receive buffer (a slow link), the rest at once, then answering 201; ``received`` keeps
    the MD5 of each body."""

    def __init__(self, rate: int, slow_bytes: int) -> None:
        self.rate = rate
        self.slow_bytes = slow_bytes
        self.received: list[str] = []
        super().__init__()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # taken on by accepted ones

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            head = b"".join(iter(reader.readline, b"\r\n")).lower()
            md5 = hashlib.md5()
            if b"transfer-encoding: chunked" in head:
                while size := int(reader.readline(), 16):
                    self._take(reader, size, md5)
                    reader.readline()
                reader.readline()
            else:
                self._take(reader, int(head.split(b"content-length:")[1].split(b"\r\n")[0]), md5)
            self.received.append(md5.hexdigest())
            conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    def _take(self, reader: BinaryIO, size: int, md5: Any) -> None:
        while size:
            piece = reader.read1(min(size, 64 * 1024))  # type: ignore[attr-defined]
            md5.update(piece)
            size -= len(piece)
            if self.slow_bytes > 0:
                self.slow_bytes -= len(piece)
                time.sleep(len(piece) / self.rate)


@both_flavours
def test_one_large_write_goes_on_while_the_node_takes_it_steadily(flavour: Flavour) -> None:
    """12 MiB written at once, to a node taking its first 8 MiB at 8 MiB/s, with a storage timeout
    of 0.5 s: the timeout bounds each piece the node takes, not the whole write (it failed at 0.5 s)."""
    node = _SteadyNode(rate=8 * MIB, slow_bytes=8 * MIB)
    fid_path = f"http://127.0.0.1:{node.port}/dev1/0/000/000/0000000007.fid"
    tracker = ScriptedTracker(lambda line: f"OK fid=7&dev_count=1&devid_1=1&path_1={fid_path}\r\n".encode()
                              if line.startswith(b"create_open") else b"OK \r\n")
    data = os.urandom(12 * MIB)
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker], storage_timeout=0.5)
        if flavour.name == "sync":
            with client.new_file("big", size=len(data)) as upload:
                upload.write(data)
        else:
            assert client.store_file("big", _async_chunks([data])) == len(data)
    finally:
        tracker.stop()
        node.stop()
    assert node.received == [hashlib.md5(data).hexdigest()]


class _FailingAfter(io.RawIOBase):
    """A source whose read fails once ``good`` bytes were read, as a disk or a network share can."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            raise OSError(errno.EIO, "read failed midway")
        count = min(len(buffer), self.left)
        buffer[:count] = b"x" * count
        self.left -= count
        return count


def _chunks_failing_after(count: int) -> Iterator[bytes]:
    yield from [b"y" * MIB] * count
    raise OSError(errno.EIO, "read failed midway")


def _progress_failing(sent: int) -> None:
    raise KeyboardInterrupt


def _interrupted_connecting(file: Any) -> Any:
    """``file`` whose first connection to a storage node is interrupted (Ctrl-C), the next not."""
    connect = file._open_stream

    def interrupted_once(*args: Any) -> Any:
        file._open_stream = connect
        raise KeyboardInterrupt

    file._open_stream = interrupted_once
    return file


@pytest.mark.parametrize("write", [
    pytest.param(lambda file: file.write_from(_FailingAfter(3 * MIB)), id="source-fails"),
    pytest.param(lambda file: file.write_chunks(_chunks_failing_after(3)), id="chunks-fail"),
    pytest.param(lambda file: file.write_from(io.BytesIO(b"z" * 3 * MIB), progress=_progress_failing), id="ctrl-c"),
    pytest.param(lambda file: file.write_chunks([b"z" * MIB] * 3, progress=_progress_failing), id="chunks-ctrl-c"),
    pytest.param(lambda file: _interrupted_connecting(file).write_from(io.BytesIO(b"z")), id="ctrl-c-connecting"),
])
def test_a_new_file_closed_after_its_body_failed_midway_commits_nothing(client: Client,
                                                                        write: Callable[[Any], Any]) -> None:
    """pymogile's ``try: write ... finally: close()``: the close finished the PUT of what had been
    sent, and the key pointed at the first megabytes."""
    client.store_content("kept", b"the old version", cls="thumb")
    file = client.new_file("kept", cls="thumb")
    with pytest.raises((OSError, KeyboardInterrupt)):
        try:
            write(file)
        finally:
            file.close()
    assert client.get_file_data("kept") == b"the old version"


@pytest.mark.parametrize("wrapped", [
    pytest.param(lambda file: io.TextIOWrapper(file, encoding="utf-8", newline=""), id="text"),
    pytest.param(lambda file: io.TextIOWrapper(io.BufferedWriter(file), encoding="utf-8", newline=""),
                 id="text-buffered"),
    pytest.param(io.BufferedWriter, id="buffered"),
    pytest.param(contextlib.closing, id="closing"),
])
def test_a_new_file_in_a_wrapper_ending_in_error_commits_nothing(client: Client, wrapped: Callable[[Any], Any]) -> None:
    """A wrapper closes the file it wraps, its ``with`` ending in error too: the key held the rows
    written before the failure."""
    client.store_content("report.csv", b"the old version", cls="thumb")
    with pytest.raises(UploadError, match="'report.csv' was not stored: its file was closed while "
                                          "ZeroDivisionError") as raised:
        with wrapped(client.new_file("report.csv", cls="thumb")) as out:
            out.write("a,b\r\n" if isinstance(out, io.TextIOBase) else b"a,b\r\n")
            1 / 0
    assert isinstance(raised.value.__context__, ZeroDivisionError)  # the failure, in the traceback
    assert client.get_file_data("report.csv") == b"the old version"


def test_a_new_file_in_a_wrapper_dropped_unclosed_commits_nothing(client: Client) -> None:
    client.store_content("report.csv", b"the old version", cls="thumb")

    def write() -> None:
        out = io.TextIOWrapper(io.BufferedWriter(client.new_file("report.csv", cls="thumb")), encoding="utf-8")
        out.write("a,b\n")
        raise ZeroDivisionError  # out is dropped unclosed with the traceback, after the handler

    with contextlib.suppress(ZeroDivisionError):
        write()
    gc.collect()
    assert client.get_file_data("report.csv") == b"the old version"


def test_a_new_file_dropped_unclosed_commits_nothing_and_says_so(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """pymogile's files committed as they were collected, and its tests store files so: here
    nothing is stored, and that went unsaid."""
    client.new_file("spam.txt", cls="thumb").write(b"SPAM")
    gc.collect()
    assert "'spam.txt' not stored: its file was dropped unclosed" in caplog.messages
    with pytest.raises(UnknownKeyError):
        client.file_info("spam.txt")


def test_a_new_file_closed_in_a_finally_after_its_source_failed_commits_nothing(client: Client) -> None:
    """pymogile's ``try: write ... finally: close()``, the source failing between writes."""
    client.store_content("kept", b"the old version", cls="thumb")
    file = client.new_file("kept", cls="thumb")
    with pytest.raises(UploadError, match="not stored") as raised:
        try:
            for chunk in _chunks_failing_after(2):
                file.write(chunk)
        finally:
            file.close()
    assert isinstance(raised.value.__context__, OSError)
    assert client.get_file_data("kept") == b"the old version"


def test_a_new_file_closed_in_an_except_clause_of_another_failure_is_refused_aloud(client: Client) -> None:
    client.store_content("kept", b"the old version", cls="thumb")
    file = client.new_file("kept", cls="thumb")
    file.write(b"the new version")
    try:
        {}["missing"]
    except KeyError:
        with pytest.raises(UploadError, match="closed while KeyError"):
            file.close()
    assert client.get_file_data("kept") == b"the old version"


@contextlib.contextmanager
def _report(client: Client) -> Iterator[Any]:
    """A file the block writes to, which records a ValueError of the block instead of raising it."""
    with client.new_file("report.txt", cls="thumb") as file:
        try:
            yield file
        except ValueError as error:
            file.write(f"failed: {error}".encode())


def _sink(file: Any) -> Generator[None, bytes, None]:
    try:
        while True:
            file.write((yield))
    finally:
        file.close()


@pytest.mark.parametrize("write", [
    pytest.param(lambda client: _in_an_exit_stack(client), id="exit-stack-suppressing"),
    pytest.param(lambda client: _in_a_context_manager(client), id="context-manager-handling"),
    pytest.param(lambda client: _to_a_generator(client), id="generator-closed"),
])
def test_a_new_file_whose_block_ends_well_commits_whatever_is_handled_around_it(
        client: Client, write: Callable[[Client], None]) -> None:
    write(client)
    assert client.get_file_data("report.txt") == b"failed: 42"


def _in_an_exit_stack(client: Client) -> None:
    with contextlib.ExitStack() as stack:  # its callbacks run while the suppressed error is handled
        file = stack.enter_context(client.new_file("report.txt", cls="thumb"))
        stack.enter_context(contextlib.suppress(KeyError))
        file.write(b"failed: 42")
        raise KeyError(42)


def _in_a_context_manager(client: Client) -> None:
    with _report(client):
        raise ValueError(42)


def _to_a_generator(client: Client) -> None:
    sink = _sink(client.new_file("report.txt", cls="thumb"))
    next(sink)
    sink.send(b"failed: ")
    sink.send(b"42")
    sink.close()  # GeneratorExit: its end, no failure


def test_a_new_file_made_and_closed_in_an_except_clause_commits(client: Client) -> None:
    """The exception handled when the file was made is no failure of its writing."""
    try:
        client.get_file_data("made-on-a-miss")
    except UnknownKeyError:
        with io.TextIOWrapper(client.new_file("made-on-a-miss", cls="thumb"), encoding="utf-8") as out:
            out.write("default\n")
    assert client.get_file_data("made-on-a-miss") == b"default\n"


def test_a_new_file_closed_or_aborted_takes_no_more_bytes(client: Client) -> None:
    with client.new_file("doc", cls="thumb") as file:
        file.write(b"kept")
    aborted = client.new_file("other", cls="thumb")
    aborted.write(b"dropped")
    aborted.abort()
    for closed in (file, aborted):
        with pytest.raises(ValueError, match="closed file"):
            closed.write(b"more")
        with pytest.raises(ValueError, match="closed file"):
            closed.write_from(io.BytesIO(b"more"))
    assert client.get_file_data("doc") == b"kept"
    with pytest.raises(UnknownKeyError):
        client.file_info("other")


@both_flavours
@pytest.mark.parametrize("as_path", [str, Path], ids=["str", "Path"])
def test_store_file_refuses_a_path_rather_than_read_a_local_file(flavour: Flavour, devmogile: DevMogileFS,
                                                                 tmp_path: Path, as_path: Callable) -> None:
    """Text a view passes on (a form field) is never read as a file of the server's."""
    secret = as_path(_written(tmp_path / "secret.txt", b"the server's own file"))
    client = flavour.Client(DOMAIN, devmogile.trackers)
    client.store_content("doc", b"old", "thumb")
    with pytest.raises(TypeError, match=f"store_file of 'doc' takes .*not {type(secret).__name__}"):
        client.store_file("doc", secret, "thumb")
    assert client.get_file_data("doc") == b"old"


@pytest.mark.parametrize("given", [io.StringIO("text"), 5, None], ids=["text-file", "number", "none"])
def test_store_file_names_what_it_takes_for_what_it_cannot_send(client: Client, given: object) -> None:
    """Its message was the Uploader's, offering "a path", which store_file then refused."""
    with pytest.raises(TypeError, match=re.escape(f"store_file of 'doc' takes bytes, a file opened in binary mode or "
                                                  f"an iterable of bytes, not {type(given).__name__}") + "$"):
        client.store_file("doc", given)  # type: ignore[arg-type]
    with pytest.raises(UnknownKeyError):
        client.file_info("doc")


@pytest.mark.parametrize("source", [
    pytest.param(lambda tmp: _written(tmp / "file.bin", b"data"), id="path"),
    pytest.param(lambda tmp: [b"chunk"], id="list"),
    pytest.param(lambda tmp: io.StringIO("text"), id="text-file"),
    pytest.param(lambda tmp: None, id="none"),
])
def test_the_asyncio_store_file_refuses_what_it_cannot_send_naming_it(devmogile: DevMogileFS, tmp_path: Path,
                                                                       source) -> None:
    given = source(tmp_path)

    async def refused_then_bytes() -> bytes:
        client = AsyncClient(DOMAIN, devmogile.trackers)
        await client.store_content("doc", b"old", "thumb")
        with pytest.raises(TypeError, match=f"store_file of 'doc' takes .*not {type(given).__name__}"):
            await client.store_file("doc", given, "thumb")
        kept = await client.get_file_data("doc")
        assert await client.store_file("doc", bytearray(b"new"), "thumb") == 3
        await client.aclose()
        return kept

    assert asyncio.run(refused_then_bytes()) == b"old"
    assert Client(DOMAIN, devmogile.trackers).get_file_data("doc") == b"new"


@both_flavours
@pytest.mark.parametrize(("odd", "named"), [("text", "bytes, not str"), (7, "bytes, not int"),
                                            (memoryview(b"abcd")[::2], "not a non-contiguous memoryview")],
                         ids=["str", "int", "non-contiguous"])
def test_a_chunk_that_is_not_bytes_is_refused_naming_it_and_the_key_keeps_its_data(flavour: Flavour, client: Client,
                                                                                   odd: object, named: str) -> None:
    """Nothing of it is sent: not the zero bytes ``bytes(7)`` makes."""
    store(flavour, client, "doc", b"old", "thumb")
    with pytest.raises(TypeError, match=f"upload of 'doc' takes .*{named}"):
        store(flavour, client, "doc", [b"new ", odd], "thumb")  # type: ignore[list-item]
    assert client.get_file_data("doc") == b"old"


class _ReplicaCutMidway(io.RawIOBase):
    """A source read from another key's replica, which breaks after its first piece."""

    def __init__(self) -> None:
        self.pieces = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.pieces += 1
        if self.pieces > 1:
            raise StorageError("http://10.0.0.9:7500/dev1/0/000/000/0000000042.fid: connection reset", "")
        return b"a" * 100_000


@both_flavours
def test_a_source_failing_with_a_storage_error_leaves_no_put_open(flavour: Flavour, client: Client,
                                                                  devmogile: DevMogileFS) -> None:
    """A copy from another key (``store_file(key, client.read_file(other))``) whose replica breaks
    midway: the upload fails naming it, the key keeps its data, and the PUT to the node is dropped
    at once, not held open, its body half sent, for as long as the exception lives."""
    store(flavour, client, "copy", b"old", "thumb")
    with pytest.raises(UploadError, match="connection reset") as failed:
        store(flavour, client, "copy", _ReplicaCutMidway(), "thumb")
    assert sum(node_connections(node.port, os.getpid()) for node in devmogile.nodes) == 0
    assert failed.value is not None and client.get_file_data("copy") == b"old"


@both_flavours
def test_a_successful_upload_drops_cached_paths(flavour: Flavour, client: Client) -> None:
    dropped: list[str] = []
    client.add_change_listener(dropped.append)
    store(flavour, client, "cached", b"x", "thumb")
    assert dropped == ["cached"]


@both_flavours
def test_an_upload_interrupted_at_create_close_drops_cached_paths(flavour: Flavour, devmogile: DevMogileFS,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[str] = []
    client = flavour.Client(DOMAIN, devmogile.trackers, on_change=dropped.append)
    pool, interruption = client.pool, KeyboardInterrupt if flavour.name == "sync" else asyncio.CancelledError
    carried_out = pool.request

    def interrupted(command: str, *args: Any, **kwargs: Any) -> Any:
        """The request, then Ctrl-C (a cancelled task) as its answer comes: create_close was carried out."""
        if command != "create_close":
            return carried_out(command, *args, **kwargs)
        if flavour.name == "sync":
            carried_out(command, *args, **kwargs)
            raise interruption()

        async def cancelled() -> Any:
            await carried_out(command, *args, **kwargs)
            raise interruption()
        return cancelled()

    monkeypatch.setattr(pool, "request", interrupted)
    with pytest.raises((KeyboardInterrupt, asyncio.CancelledError, concurrent.futures.CancelledError)):
        store(flavour, client, "interrupted", b"new data", "thumb")
    assert dropped == ["interrupted"]
    assert Client(DOMAIN, devmogile.trackers).get_file_data("interrupted") == b"new data"


@contextmanager
def _losing_create_close_answers(devmogile: DevMogileFS) -> Iterator[ScriptedTracker]:
    """A relay to the tracker that hangs up on the client once the tracker has answered
    ``create_close``: the upload is carried out and its answer lost."""
    upstream = TrackerConnection(devmogile.tracker_address, 1.0, 5.0)
    lock = threading.Lock()

    def forward(line: bytes) -> bytes | None:
        with lock:
            reply = upstream.roundtrip(line)
        return None if line.startswith(b"create_close") else reply

    relay = ScriptedTracker(forward)
    try:
        yield relay
    finally:
        relay.stop()
        upstream.close()


@both_flavours
def test_a_lost_create_close_answer_is_an_unknown_outcome_and_drops_cached_paths(devmogile: DevMogileFS,
                                                                                flavour: Flavour) -> None:
    with _losing_create_close_answers(devmogile) as relay:
        backend = MemoryCache()
        backend.set(entry_key(DOMAIN, "lost"), "old paths", time.time(), 60)
        dropped: list[str] = []
        client = flavour.Client(DOMAIN, [relay.tracker], cache_backend=backend, on_change=dropped.append)
        with pytest.raises(UploadOutcomeUnknownError, match="'lost'.*may or may not point at the new data"):
            store(flavour, client, "lost", b"new data", "thumb")
        assert dropped == ["lost"] and backend.get(entry_key(DOMAIN, "lost")) is None
        assert sum(line.startswith(b"create_close") for line in relay.requests) == 1  # never repeated
    assert Client(DOMAIN, devmogile.trackers).get_file_data("lost") == b"new data"  # here, it was carried out


@both_flavours
def test_a_create_close_failing_in_the_tracker_says_the_old_version_may_be_gone(devmogile: DevMogileFS,
                                                                               flavour: Flavour) -> None:
    """mogilefsd drops the key's old file before it records the new one: a database error then
    is ``ERR failure``, after which the key may be missing. The cached paths are dropped."""
    upstream = TrackerConnection(devmogile.tracker_address, 1.0, 5.0)
    relay = ScriptedTracker(lambda line: b"ERR failure Operation+failed\r\n" if line.startswith(b"create_close")
                            else upstream.roundtrip(line))
    try:
        dropped: list[str] = []
        client = flavour.Client(DOMAIN, [relay.tracker], on_change=dropped.append)
        with pytest.raises(UploadError, match="'failed'.*create_close.*maybe after dropping the key's old version"):
            store(flavour, client, "failed", b"new data", "thumb")
        assert dropped == ["failed"]
    finally:
        relay.stop()
        upstream.close()


def test_checksums_must_be_kept_or_always(client: Client) -> None:
    with pytest.raises(ValueError, match="'kept' or 'always'"):
        Uploader(client, checksums="never")


def test_an_uploader_refuses_at_once_what_would_fail_at_its_upload(devmogile: DevMogileFS) -> None:
    """``Uploader(None)`` and an ``AsyncClient`` failed at the upload (an AttributeError, a
    coroutine never awaited), ``verify_checksums="no"`` was true, and a progress that is no
    function failed after the first chunk was sent."""
    for client in (None, "127.0.0.1:7001", AsyncClient(DOMAIN, devmogile.trackers)):
        with pytest.raises(TypeError, match="writes through a blocking Client"):
            Uploader(client)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verify_checksums must be True or False"):
        Uploader(Client(DOMAIN, devmogile.trackers), verify_checksums="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be a function"):
        Uploader(Client(DOMAIN, devmogile.trackers)).upload("k", b"data", progress="bar")  # type: ignore[arg-type]
    with pytest.raises(UnknownKeyError):
        Client(DOMAIN, devmogile.trackers).file_info("k")


def test_a_forked_child_hashes_its_uploads_on_threads_of_its_own(client: Client) -> None:
    data = os.urandom(3 * 1024 * 1024)
    Uploader(client).upload("before-fork", data, cls="original")  # the parent's hashing threads run
    pid = os.fork()
    if pid == 0:  # the child: its upload would wait forever on the parent's threads, absent here
        try:
            Uploader(client).upload("in-child", data, cls="original")
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if waited[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the child's upload hung")
    assert client.file_info("in-child").checksum == f"MD5:{hashlib.md5(data).hexdigest()}"


@both_flavours
def test_a_non_blocking_file_without_data_ready_is_refused_and_the_key_kept(flavour: Flavour, client: Client) -> None:
    store(flavour, client, "k", b"old", "thumb")
    reading, writing = os.pipe()
    os.set_blocking(reading, False)  # as an event loop's pipe is: read() gives None until data comes
    os.write(writing, b"a" * 60_000)  # the first part (less than a pipe holds); the rest would come later
    try:
        with open(reading, "rb") as source, pytest.raises(TypeError, match="non-blocking file with no data ready"):
            store(flavour, client, "k", source, "thumb")
    finally:
        os.close(writing)
    assert client.get_file_data("k") == b"old"


@both_flavours
def test_chunks_of_items_wider_than_a_byte_are_counted_in_bytes(flavour: Flavour, client: Client) -> None:
    """Any buffer is a chunk, counted in bytes: a memoryview, an ``array``, an ``mmap``."""
    numbers = array.array("i", range(10_000))  # 4 bytes an item
    mapped = mmap.mmap(-1, 5)
    mapped.write(b"mmap!")
    chunks = [memoryview(numbers), numbers, mapped]
    assert store(flavour, client, "numbers", chunks, "thumb") == 2 * len(numbers.tobytes()) + 5
    assert client.get_file_data("numbers") == numbers.tobytes() * 2 + b"mmap!"


@both_flavours
def test_a_source_may_resize_or_close_its_buffer_once_asked_for_the_next_chunk(flavour: Flavour,
                                                                               client: Client) -> None:
    """The upload holds no view of a chunk once it asks for the next: an array grown, an mmap closed."""
    def refilled() -> Iterator[Any]:
        numbers = array.array("i", [1, 2])
        yield numbers
        numbers.append(3)
        yield numbers
        with mmap.mmap(-1, 4) as mapped:
            mapped.write(b"last")
            yield mapped

    expected = array.array("i", [1, 2]).tobytes() + array.array("i", [1, 2, 3]).tobytes() + b"last"
    assert store(flavour, client, "refilled", refilled(), "thumb") == len(expected)
    assert client.get_file_data("refilled") == expected
