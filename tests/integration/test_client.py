"""The Client, and the AsyncClient through a blocking facade (``@both_flavours``), against the
embedded MogileFS over real sockets."""

from __future__ import annotations

import array
import asyncio
import hashlib
import inspect
import io
import logging
import re
import socket
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import DOMAIN
from integration._async_facade import Flavour, both_flavours, flavour  # noqa: F401 (a fixture)
from integration._slow_clients import node_connections
from integration._wire_client import LineClient, eventually, free_port, upload
from wiretools import TEN, CountingRelay, KeptAliveNode, ScriptedTracker, collating_tracker, files_tracker, honest

from mogile_middleware import (
    Admin,
    AsyncClient,
    BadKeyError,
    Client,
    KeyExistsError,
    MemoryCache,
    UnknownKeyError,
    UploadError,
)
from mogile_middleware.cache import entry_key
from mogile_middleware.client import ClientBase, Request, WeakListener
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.exceptions import (OutcomeUnknownError, ProtocolError, StorageError, TrackerError, UnregClassError,
                                          UnregDomainError)

AWKWARD_KEYS = [
    "with space.txt",
    "amp&ersand",
    "equals=sign",
    "100%",
    "plus+sign",
    "dir/sub/file.jpg",
    "café-日本.png",
    "a,b:c\\d~e \"<x>'",
    "k" * 255,
    "é" * 127 + "k",  # 255 bytes of UTF-8
]


@pytest.fixture
def client(devmogile: DevMogileFS, flavour: Flavour):
    client = flavour.Client(DOMAIN, devmogile.trackers)
    yield client
    client.close()


@both_flavours
@pytest.mark.parametrize("key", AWKWARD_KEYS, ids=lambda key: key[:20])
def test_awkward_keys_round_trip(client: Client, key: str) -> None:
    data = f"content of {key}".encode()
    assert client.store_content(key, data, cls="thumb") == len(data)
    assert client.get_file_data(key) == data
    info = client.file_info(key)
    assert (info.key, info.length, info.cls, info.domain) == (key, len(data), "thumb", DOMAIN)
    assert key in client.list_keys(key[:3])
    moved = "moved/" + key[:40]
    client.rename(key, moved)
    assert client.get_file_data(moved) == data
    with pytest.raises(UnknownKeyError):
        client.get_paths(key)
    client.rename(moved, key)
    assert client.get_file_data(key) == data
    client.delete(key)
    with pytest.raises(UnknownKeyError):
        client.file_info(key)


def refused_before_anything_is_sent(flavour: Flavour, key: str, *, asking: bool) -> None:
    """Every call that creates ``key`` (and with ``asking``, every call that asks about it) raises
    :class:`BadKeyError` with nothing sent to the tracker."""
    tracker = ScriptedTracker(lambda line: b"OK \r\n")
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker])
        calls = [
            lambda: client.store_content(key, b"x"),
            lambda: client.store_file(key, io.BytesIO(b"x")),
            lambda: client.rename("ok", key),
        ]
        if flavour.name == "sync":
            calls.append(lambda: client.new_file(key))
        if asking:
            calls += [
                lambda: client.get_paths(key),
                lambda: client.file_info(key),
                lambda: client.delete(key),
                lambda: client.rename(key, "ok"),
                lambda: client.update_class(key, "thumb"),
            ]
        for call in calls:
            with pytest.raises(BadKeyError):
                call()
        assert tracker.requests == [] and tracker.connections == 0
    finally:
        tracker.stop()


@pytest.mark.parametrize("key", [pytest.param("", id="empty"), pytest.param("a\ud800b", id="lone-surrogate")])
@both_flavours
def test_keys_no_tracker_holds_are_refused_before_anything_is_sent(flavour: Flavour, key: str) -> None:
    refused_before_anything_is_sent(flavour, key, asking=True)


#: Keys a tracker holds when another client stored them (mogilefsd 2.73 on SQLite does), which
#: this client does not create: MySQL's schema cuts a key at 255 bytes, and no URL serves the others.
NOT_CREATED_KEYS = [
    pytest.param("k" * 256, id="256-bytes"),
    pytest.param("é" * 128, id="256-utf8-bytes"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\rb", id="cr"),
    pytest.param("a\nb", id="lf"),
]


@pytest.mark.parametrize("key", NOT_CREATED_KEYS)
@both_flavours
def test_keys_the_client_does_not_create_are_refused_before_anything_is_sent(flavour: Flavour, key: str) -> None:
    refused_before_anything_is_sent(flavour, key, asking=False)


@pytest.mark.parametrize("key", NOT_CREATED_KEYS)
@both_flavours
def test_another_clients_key_the_client_does_not_create_is_read_listed_reclassed_renamed_and_deleted(
        devmogile: DevMogileFS, client: Client, key: str) -> None:
    # Each call raised BadKeyError: such a key could be listed, and not even deleted.
    with LineClient(devmogile.tracker_address) as tracker:
        assert upload(tracker, DOMAIN, key, b"theirs", "thumb") == b"OK \r\n"
        assert upload(tracker, DOMAIN, key + "2", b"theirs too", "thumb") == b"OK \r\n"
    assert client.list_keys(key[:1]) == [key, key + "2"]
    assert (client.file_info(key).key, client.get_file_data(key), len(client.get_paths(key))) == (key, b"theirs", 1)
    client.update_class(key, "avatar")
    assert client.file_info(key).cls == "avatar"
    client.rename(key, "renamed")
    assert client.get_file_data("renamed") == b"theirs"
    client.delete(key + "2")
    for gone in (key, key + "2"):
        with pytest.raises(UnknownKeyError):
            client.file_info(gone)


@both_flavours
def test_a_prefix_that_is_not_utf8_text_is_refused_before_anything_is_sent(flavour: Flavour) -> None:
    tracker = ScriptedTracker(lambda line: b"OK key_count=0\r\n")
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker])
        for prefix, after in (("a\ud800", None), ("a", "a\ud800")):
            with pytest.raises(BadKeyError, match="not UTF-8 text"):
                client.list_keys(prefix, after)
        assert tracker.requests == [] and tracker.connections == 0
    finally:
        tracker.stop()


@pytest.mark.parametrize("key", [None, 42, ["a"]], ids=["none", "number", "list"])
@both_flavours
def test_a_key_that_is_not_text_is_a_type_error_before_anything_is_sent(flavour: Flavour, key: object) -> None:
    tracker = ScriptedTracker(lambda line: b"OK \r\n")
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker])
        for call in (client.get_paths, client.file_info, client.delete, lambda key: client.rename("ok", key),
                     lambda key: client.store_content(key, b"x")):
            with pytest.raises(TypeError, match=f"a key is a str or bytes, not {type(key).__name__}"):
                call(key)
        assert tracker.requests == [] and tracker.connections == 0
    finally:
        tracker.stop()


@both_flavours
def test_classes_set_replica_counts(client: Client) -> None:
    client.store_content("two-copies", b"avatar bytes", cls="avatar")
    client.store_content("one-copy", b"thumb bytes", cls="thumb")
    two, one = client.get_paths("two-copies"), client.get_paths("one-copy")
    assert len(two) == 2 and len(set(two)) == 2 and len(one) == 1
    assert client.file_info("two-copies").devcount == 2
    client.update_class("one-copy", "avatar")
    assert len(client.get_paths("one-copy")) == 2
    assert client.file_info("one-copy").cls == "avatar"


@both_flavours
def test_unknown_class_names_the_class_and_the_domain(client: Client) -> None:
    with pytest.raises(UnregClassError, match="'nosuch'.*'testdom'"):
        client.store_content("k", b"x", cls="nosuch")
    with pytest.raises(UnknownKeyError, match="^unknown_key: no key 'k' in domain 'testdom'$"):
        client.file_info("k")
    client.store_content("k", b"x", cls="thumb")
    # mogilefsd's code is another (class_not_found): the exception is caught as every unknown class is.
    with pytest.raises(UnregClassError, match="class 'nosuch' is not registered in domain 'testdom'") as raised:
        client.update_class("k", "nosuch")
    assert raised.value.code in ("unreg_class", "class_not_found")


@both_flavours
def test_errors_name_the_key_they_are_about(client: Client) -> None:
    """The tracker's ``ERR unknown_key unknown_key`` names no key: the error does."""
    for call, key in [(lambda: client.get_paths("gone/1"), "gone/1"),
                      (lambda: client.delete("gone/2"), "gone/2"),
                      (lambda: client.rename("gone/3", "other"), "gone/3"),
                      (lambda: client.read_file("gone/4"), "gone/4"),
                      # Given as bytes, named as the text they are (it read b'gone/5').
                      (lambda: client.delete(b"gone/5"), "gone/5"),
                      (lambda: client.file_info(b"gone/6"), "gone/6")]:
        with pytest.raises(UnknownKeyError, match=f"^unknown_key: no key '{key}' in domain 'testdom'$"):
            call()
    client.store_content("taken", b"x", cls="thumb")
    client.store_content("source", b"y", cls="thumb")
    with pytest.raises(KeyExistsError, match="^key_exists: key 'taken' exists already in domain 'testdom'$"):
        client.rename(b"source", b"taken")


@both_flavours
def test_unknown_domain(devmogile: DevMogileFS, flavour: Flavour) -> None:
    with pytest.raises(UnregDomainError, match="no domain 'nosuchdomain' on the trackers"):
        flavour.Client("nosuchdomain", devmogile.trackers).get_paths("k")
    with pytest.raises(UnregDomainError, match="no domain 'nosuchdomain' on the trackers"):
        flavour.Client("nosuchdomain", devmogile.trackers).store_content("k", b"x")


def test_new_file_streams_and_commits_on_close(client: Client) -> None:
    digest = hashlib.md5()
    with client.new_file("streamed.bin", cls="thumb") as upload:
        for i in range(64):
            block = bytes([i]) * 65536
            upload.write(block)
            digest.update(block)
    with client.read_file("streamed.bin") as body:
        received = hashlib.md5()
        for chunk in body.iter_chunks():
            received.update(chunk)
    assert received.hexdigest() == digest.hexdigest()
    assert client.file_info("streamed.bin").length == 64 * 65536


def cut_short_on_its_disk(devmogile: DevMogileFS, key: str, body: bytes) -> None:
    """Store ``body`` under ``key`` in two replicas, then cut the tracker's first one short on its node's disk."""
    Client(DOMAIN, devmogile.trackers).store_content(key, body, cls="avatar")
    first = Client(DOMAIN, devmogile.trackers).get_paths(key)[0]
    damaged = next(node for node in devmogile.nodes if first.startswith(node.url))
    (damaged.docroot / first.split("/", 3)[3]).write_bytes(body[:5000])


@both_flavours
def test_a_replica_cut_short_on_its_disk_is_passed_over(client: Client, devmogile: DevMogileFS) -> None:
    """It was read as the whole file, as pymogile reads it: 5000 bytes of 102400, no error."""
    body = bytes(range(256)) * 400
    cut_short_on_its_disk(devmogile, "cut", body)
    assert [client.get_file_data("cut") for _ in range(4)] == [body] * 4  # whichever replica comes first


def test_a_replica_cut_short_on_its_disk_is_not_opened(devmogile: DevMogileFS) -> None:
    """As above, for the bodies of ``read_file``."""
    body = bytes(range(256)) * 400
    cut_short_on_its_disk(devmogile, "cut", body)
    client, async_client = Client(DOMAIN, devmogile.trackers), AsyncClient(DOMAIN, devmogile.trackers)

    async def read_async() -> bytes:
        opened = await async_client.read_file("cut")
        try:
            return b"".join([chunk async for chunk in opened.chunks()])
        finally:
            await opened.aclose()
            await async_client.aclose()

    for _ in range(4):
        with client.read_file("cut") as opened:
            assert b"".join(opened.iter_chunks()) == body
    client.close()
    assert [asyncio.run(read_async()) for _ in range(4)] == [body] * 4


def test_an_exception_inside_new_file_leaves_no_key(client: Client) -> None:
    with pytest.raises(RuntimeError):
        with client.new_file("aborted", cls="thumb") as upload:
            upload.write(b"half of it")
            raise RuntimeError("the producer failed")
    with pytest.raises(UnknownKeyError):
        client.file_info("aborted")


def test_overwrite_keeps_old_data_until_the_new_upload_commits(client: Client) -> None:
    client.store_content("doc", b"version 1", cls="thumb")
    old_fid = client.file_info("doc").fid
    with pytest.raises(RuntimeError):
        with client.new_file("doc", cls="thumb") as upload:
            upload.write(b"version 2, never finished")
            raise RuntimeError
    assert client.get_file_data("doc") == b"version 1"
    client.store_content("doc", b"version 2", cls="thumb")
    assert client.get_file_data("doc") == b"version 2"
    assert client.file_info("doc").fid != old_fid


@both_flavours
def test_an_upload_goes_to_the_next_tracker_when_the_first_never_answers(devmogile: DevMogileFS,
                                                                        flavour: Flavour) -> None:
    """create_open only reserves a file number: asked again of the next tracker, the upload goes on."""
    silent = ScriptedTracker(lambda line: b"")
    client = flavour.Client(DOMAIN, [silent.tracker, *devmogile.trackers], io_timeout=0.3)
    try:
        assert client.store_content("via-the-second", b"data", cls="thumb") == 4
        assert client.get_file_data("via-the-second") == b"data"
    finally:
        client.close()
        silent.stop()


@both_flavours
def test_a_delete_whose_answer_is_lost_names_the_key_whose_state_it_leaves_unknown(flavour: Flavour) -> None:
    """Logged, it named the tracker alone: which file may or may not be gone, no line said."""
    cutting = ScriptedTracker(lambda line: None)  # closes the connection on every request
    client = flavour.Client(DOMAIN, [cutting.tracker])
    try:
        with pytest.raises(OutcomeUnknownError, match=f"^key 'old/report.pdf' in domain '{DOMAIN}': "
                                                      f"{cutting.tracker} failed after 'delete' was sent"):
            client.delete(b"old/report.pdf")
        with pytest.raises(OutcomeUnknownError, match=f"^keys 'a' and 'b' in domain '{DOMAIN}': "
                                                      f"{cutting.tracker} failed after 'rename' was sent"):
            client.rename("a", "b")
    finally:
        client.close()
        cutting.stop()


@both_flavours
def test_a_class_change_whose_answer_is_lost_is_asked_of_the_next_tracker(devmogile: DevMogileFS,
                                                                          flavour: Flavour) -> None:
    """Setting a file's class twice sets it once (README: retried on the next tracker): it used to
    raise OutcomeUnknownError with the class unchanged."""
    client = flavour.Client(DOMAIN, devmogile.trackers)
    cutting = ScriptedTracker(lambda line: None)  # closes the connection on every request
    moving = flavour.Client(DOMAIN, [cutting.tracker, *devmogile.trackers])
    try:
        client.store_content("moving", b"data", cls="thumb")
        moving.update_class("moving", "avatar")
        assert client.file_info("moving").cls == "avatar"
        assert cutting.requests and all(line.startswith(b"updateclass ") for line in cutting.requests)
    finally:
        for closed in (client, moving):
            closed.close()
        cutting.stop()


@both_flavours
@pytest.mark.parametrize("wrong", [
    pytest.param(b"HTTP/1.0 206 Partial Content\r\nContent-Range: bytes 0-9/20\r\nContent-Length: 10\r\n\r\n" + TEN,
                 id="206-to-a-get"),
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 10, 11\r\n\r\n" + TEN, id="two-lengths"),
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: +10\r\n\r\n" + TEN, id="signed-length"),
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 1" + b"0" * 4400 + b"\r\n\r\n" + TEN, id="huge-length"),
    pytest.param(b"HTTP/1.0 200 OK\r\n\r\n" + TEN[:5], id="no-length-cut-short"),
])
def test_a_replica_whose_answer_is_not_the_whole_file_is_passed_over(flavour: Flavour, wrong: bytes) -> None:
    """Without the file's length to check, the client took a part, or a body of no known end, as the
    file (storage nodes always send a Content-Length)."""
    bad, good = KeptAliveNode(lambda head: wrong, closes=True), KeptAliveNode(honest)
    tracker = files_tracker({"k": (9, 10, [bad.url(9), good.url(9)])})
    client = flavour.Client(DOMAIN, [tracker.tracker])
    try:
        assert client.get_file_data("k") == TEN
        assert len(bad.requests) == len(good.requests) == 1
    finally:
        client.close()
        for server in (tracker, bad, good):
            server.stop()


@both_flavours
def test_close_closes_the_idle_connections_to_trackers_and_storage_nodes(flavour: Flavour) -> None:
    """``close()`` and ``aclose()`` end the same connections: the blocking one left the storage
    node's open."""
    node = KeptAliveNode(honest)
    tracker = files_tracker({"k": (9, 10, [node.url(9)])})
    client = flavour.Client(DOMAIN, [tracker.tracker])
    try:
        assert client.get_file_data("k") == TEN
        assert (node_connections(node.port), node_connections(tracker.port)) == (1, 1)
        client.close()
        connections = eventually(lambda: (node_connections(node.port), node_connections(tracker.port)),
                                 lambda counts: counts == (0, 0))
        assert connections == (0, 0)
    finally:
        for server in (tracker, node):
            server.stop()


@both_flavours
def test_keys_pages_through_every_key(client: Client) -> None:
    names = [f"many/{n:04d}" for n in range(25)]
    for name in names:
        client.store_content(name, b"x", cls="thumb")
    assert client.list_keys("many/", limit=10) == names[:10]
    assert client.list_keys("many/", after=names[9], limit=10) == names[10:20]
    assert list(client.keys("many/")) == names
    assert list(client.keys(b"many/")) == names  # a prefix as bytes, as keys may be
    assert list(client.keys(None)) == list(client.keys("")) != []  # as list_keys and pymogile take it
    with pytest.raises(TypeError, match="a prefix is a str or bytes, not int"):
        list(client.keys(5))
    for limit in (0, -1, 2.5, True):  # mogilefsd would read 0 as 1000 and -1 as every key
        with pytest.raises(ValueError, match="limit must be a whole number >= 1"):
            client.list_keys("many/", limit=limit)
    assert client.list_keys("nothing/") == []


@both_flavours
def test_keys_pages_through_prefixes_the_tracker_matches_loosely(client: Client,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracker matches a prefix whatever its case, and mogilefsd refuses an ``after`` that does
    not match the prefix read as a regular expression: keys() gives the keys that start with the
    prefix exactly, over pages of 10 here (1000 against a tracker)."""
    monkeypatch.setattr(ClientBase, "keys_page", 10)
    names = {prefix: [f"{prefix}{n:02d}" for n in range(15)] for prefix in ("Photos/", "photos/", "c++/", "c/")}
    for name in sum(names.values(), []):
        client.store_content(name, b"x", cls="thumb")
    for prefix, expected in names.items():
        assert list(client.keys(prefix)) == expected
    assert list(client.keys("c++/1")) == names["c++/"][10:]
    assert list(client.keys("nothing/")) == []
    # "(x" lists its second page by no prefix at all: it ends with the page that goes past its keys.
    brackets = [f"(x/{n:02d}" for n in range(11)]
    for name in brackets:
        client.store_content(name, b"x", cls="thumb")
    requests: list[str] = []
    for cls in (Client, AsyncClient):
        monkeypatch.setattr(cls, "_ask", _counted(cls._ask, requests))
    assert list(client.keys("(x")) == brackets and requests == ["list_keys", "list_keys"]
    # "v1.0/" lists its next pages by "v1": from below "v1.0/", not through every "v1-old/" key.
    versions = [f"v1.0/{n:02d}" for n in range(3)]
    for name in [*(f"V1.0/{n:02d}" for n in range(10)), *versions, *(f"v1-old/{n:02d}" for n in range(30))]:
        client.store_content(name, b"x", cls="thumb")
    requests.clear()
    assert list(client.keys("v1.0/")) == versions and requests == ["list_keys", "list_keys"]


@both_flavours
def test_keys_gives_the_key_equal_to_the_prefix_after_a_page_of_other_cases(client: Client,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A page filled with keys in another case ends before the prefix itself, and the next page,
    after the prefix, cannot hold it: it is asked for alone, and given only where it exists."""
    monkeypatch.setattr(ClientBase, "keys_page", 10)
    for name in [*(f"EQ/{n:02d}" for n in range(11)), "eq", "eq/1"]:
        client.store_content(name, b"x", cls="thumb")
    assert list(client.keys("eq")) == ["eq", "eq/1"]
    client.delete("eq")
    assert list(client.keys("eq")) == ["eq/1"]


@both_flavours
@pytest.mark.parametrize(("names", "prefix", "page", "asked"), [
    pytest.param(["Photos/a1", "Photos/b2", "photos/a3", "photos/a4"], "Photos/", 3, 2, id="told-apart"),
    # The first page, asked by the whole prefix, holds none of the keys the prefix cut before its
    # "." matches: asked by that one, the next page began with such a key, taken for a collation's,
    # and the listing went round in circles.
    pytest.param(["A.b1", "a.b2", "A.c"], "A.b", 2, 1, id="first-page-by-the-whole-prefix"),
])
def test_keys_ends_after_a_page_ending_past_the_prefixs_keys_in_byte_order(
        client: Client, monkeypatch: pytest.MonkeyPatch, names: list[str], prefix: str, page: int, asked: int) -> None:
    """The page ends on a key in another case that a tracker ordering keys whatever their case
    could follow with the prefix's own: the page after it so spelled begins with this page's keys,
    so the listing ends, each key given once."""
    monkeypatch.setattr(ClientBase, "keys_page", page)
    for name in names:
        client.store_content(name, b"x", cls="thumb")
    requests: list[str] = []
    for cls in (Client, AsyncClient):
        monkeypatch.setattr(cls, "_ask", _counted(cls._ask, requests))
    assert list(client.keys(prefix)) == [name for name in names if name.startswith(prefix)]
    assert requests == ["list_keys"] * asked


@both_flavours
def test_keys_pages_in_the_trackers_byte_order_through_keys_that_are_not_utf8(client: Client,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte that is no UTF-8 comes back as a surrogate, which Python sorts below most emoji where
    the tracker sorts the byte above them: each key comes once, in the tracker's order."""
    monkeypatch.setattr(ClientBase, "keys_page", 10)
    names = [*(f"raw/\U0001F600{n}" for n in range(9)), *(f"raw/\udcff{n}" for n in range(5))]
    for name in names:
        client.store_content(name, b"x", cls="thumb")
    assert list(client.keys("raw/")) == names


@both_flavours
@pytest.mark.parametrize(("prefix", "expected"), [
    pytest.param(b"mc/\xc3", ["mc/É", "mc/é", *(f"mc/é{n:02d}" for n in range(12)), "mc/é\udc80"],
                 id="ending-inside-a-character"),
    pytest.param("mc/é", ["mc/é", *(f"mc/é{n:02d}" for n in range(12)), "mc/é\udc80"],
                 id="ending-with-a-character-a-key-goes-on"),
])
def test_keys_pages_through_a_prefix_the_tracker_reads_as_another_character(client: Client,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            prefix: str | bytes,
                                                                            expected: list[str]) -> None:
    """SQLite reads a ``LIKE`` pattern as UTF-8, and a byte from 0xC0 up with every continuation
    byte after it as one character: by a prefix ending inside "é" it matched no key, and by "é",
    not "é" followed by the byte 0x80. The keys before the prefix's are not asked for (a page of 10
    here): the two pages hold the prefix's 15 or 14 keys, and the key equal to the prefix is asked
    alone (a tracker comparing keys as text may not list it after the page's start)."""
    monkeypatch.setattr(ClientBase, "keys_page", 10)
    for name in dict.fromkeys([*(f"mc/{n:02d}" for n in range(12)), "mc/z", "md/é", "mc/É", *expected]):
        client.store_content(name, b"x", cls="thumb")
    requests: list[str] = []
    for cls in (Client, AsyncClient):
        monkeypatch.setattr(cls, "_ask", _counted(cls._ask, requests))
    assert list(client.keys(prefix)) == expected and requests == ["file_debug", "list_keys", "list_keys"]


@both_flavours
def test_keys_asks_alone_for_the_key_equal_to_a_prefix_listed_from_below_it(flavour: Flavour) -> None:
    """mogilefsd on MySQL compares keys as text: "é" and "è" may be equal, so a page listed after
    the prefix with its last byte one less ("mc/è") leaves out the key equal to it ("mc/é")."""
    def text_collating(line: bytes) -> bytes:
        if line.startswith(b"file_debug"):
            return b"OK fid_fid=7&fid_dmid=1&fid_dkey=mc/%C3%A9&fid_length=1&fid_classid=1&fid_devcount=1\r\n"
        return b"OK key_count=1&key_1=mc/%C3%A9x&next_after=mc/%C3%A9x\r\n"  # after=mc/è: not mc/é itself

    tracker = ScriptedTracker(text_collating)
    try:
        assert list(flavour.Client("d", [tracker.tracker]).keys("mc/é")) == ["mc/é", "mc/éx"]
    finally:
        tracker.stop()


@both_flavours
@pytest.mark.parametrize(("keys", "prefix"), [
    # The byte order of a page's keys was taken for the tracker's: the next page started after the
    # page's highest key in bytes, and gave keys of this one again.
    pytest.param(["up/a1", "up/B2", "up/c3", "up/D4", "up/e5", "up/F6", "up/g7", "up/H8"], "up/", id="mixed-cases"),
    # The page ended on a key in another case, past the prefix's in bytes: the listing ended there.
    pytest.param(["Ph/a1", "ph/a2", "Ph/a3", "Ph/a4", "Ph/a5", "Ph/a6", "Ph/a7"], "Ph/", id="ending-in-another-case"),
    # A page of keys in another case only, below the prefix in bytes: the next page, after the
    # prefix itself, began the listing again, page after page without end.
    pytest.param([*(f"CSS/{n:02d}" for n in range(7)), "css/zz"], "css/", id="other-cases-first"),
    # A page in byte order too, ending on a key in another case past the prefix's in bytes, as
    # would end a listing in byte order.
    pytest.param(["Photos/a1", "Photos/a2", "photos/a3", "Photos/a4", "Photos/a5"], "Photos/",
                 id="a-page-in-byte-order-too"),
    # The same, in another case past the prefix cut before its "+": the page after it was not asked.
    pytest.param(["ab+C0", "ab+C1", "ab+C2", "ab+C3", "ab+C4", "ab+c5", "ab+C6", "ab+C7"], "ab+C",
                 id="another-case-past-the-cut"),
    # The key equal to the prefix, asked for alone, was found in another case and given as asked.
    pytest.param(["CSS/", "CSS/00", "CSS/01", "CSS/02", "css/zz"], "css/", id="the-prefix-in-another-case"),
    pytest.param(["MC/É", "mc/éx"], "mc/é", id="the-prefix-in-another-case-listed-from-below-it"),
    # Stored with a trailing space, which the collation ignores, it was never given.
    pytest.param(["mé ", "méx"], "mé", id="the-prefix-with-a-trailing-space"),
])
def test_keys_pages_through_a_tracker_that_orders_keys_whatever_their_case(
        flavour: Flavour, keys: list[str], prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """mogilefsd on MySQL orders and compares keys by the column's collation, which ignores case
    (and, with utf8_general_ci, accents and trailing spaces): every key that starts with the prefix
    exactly comes once, in the tracker's order."""
    monkeypatch.setattr(ClientBase, "keys_page", 3)
    tracker = collating_tracker(keys, weigh=_general_ci, pad_space=True)
    try:
        assert list(flavour.Client("d", [tracker.tracker]).keys(prefix)) == [key for key in keys if key.startswith(prefix)]
    finally:
        tracker.stop()


def _general_ci(text: str) -> str:
    """``text`` as MySQL's utf8_general_ci weighs it, near enough: case and accents ignored."""
    return "".join(character for character in unicodedata.normalize("NFD", text)
                   if not unicodedata.combining(character)).lower()


def _counted(ask: Callable[..., Any], requests: list[str], most: int = 50) -> Callable[..., Any]:
    """A client's ``_ask`` (plain or a coroutine function) that appends each command to ``requests``,
    and fails past ``most`` of them (a listing going round in circles)."""
    def count(request: Request) -> None:
        requests.append(request.command)
        assert len(requests) <= most, f"more than {most} requests: {requests[-5:]}"

    if inspect.iscoroutinefunction(ask):
        async def counted_async(client: Any, request: Request) -> Any:
            count(request)
            return await ask(client, request)
        return counted_async

    def counted(client: Any, request: Request) -> Any:
        count(request)
        return ask(client, request)
    return counted


@both_flavours
def test_rename_onto_an_existing_key(client: Client) -> None:
    client.store_content("a", b"A", cls="thumb")
    client.store_content("b", b"B", cls="thumb")
    with pytest.raises(KeyExistsError, match="key 'b' exists already in domain 'testdom'") as raised:
        client.rename("a", "b")
    assert raised.value.text == "Target key name already exists; can't overwrite."  # the tracker's words, kept
    assert client.get_file_data("b") == b"B"
    assert client.get_file_data("a") == b"A"  # the connection is still good


def test_the_blocking_client_refuses_a_listener_it_could_not_await(devmogile: DevMogileFS) -> None:
    async def listener(key: str) -> None:
        pass

    client = Client(DOMAIN, devmogile.trackers)
    with pytest.raises(TypeError, match="coroutine function"):
        client.add_change_listener(listener)
    with pytest.raises(TypeError, match="coroutine function"):
        Client(DOMAIN, devmogile.trackers, on_change=listener)


def test_middlewares_made_in_several_threads_on_one_client_all_hear_of_its_changes() -> None:
    """Each added its listener by replacing the client's tuple of them: one made at the same
    time as another could be lost, its middleware then serving the old paths of a key written."""
    class Locator:  # as a middleware's, heard through a weak listener
        def __init__(self, heard: list[int], number: int) -> None:
            self.heard, self.number = heard, number

        def changed(self, key: str) -> None:
            self.heard.append(self.number)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        for _ in range(100):
            client = Client(DOMAIN, "127.0.0.1:7001")
            heard: list[int] = []
            locators = [Locator(heard, number) for number in range(28)]
            for locator in locators[:20]:  # the middlewares made before
                client.add_change_listener(WeakListener(locator.changed))
            started = threading.Barrier(8)

            def add(locator: Locator) -> None:
                started.wait(5)
                client.add_change_listener(WeakListener(locator.changed))

            threads = [threading.Thread(target=add, args=(locator,)) for locator in locators[20:]]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            client._changed("k")
            assert sorted(heard) == list(range(28))
    finally:
        sys.setswitchinterval(interval)


@both_flavours
def test_arguments_of_another_kind_are_refused_at_once_naming_them(flavour: Flavour) -> None:
    """A memcached address given as the cache backend was taken, and every write then only logged
    that it could not drop the key's paths: other processes kept serving its old version."""
    tracker = ScriptedTracker(lambda line: b"OK key_count=0\r\n")
    try:
        for options, named in [({"cache_backend": "127.0.0.1:11211"}, "cache_backend must be"),
                               ({"on_change": "reload"}, "change listener is a function"),
                               ({"pool": "127.0.0.1:7001"}, "pool must be")]:
            with pytest.raises((TypeError, ValueError), match=named):
                flavour.Client(DOMAIN, [tracker.tracker], **options)
        client = flavour.Client(DOMAIN, [tracker.tracker])
        with pytest.raises(TypeError, match="change listener is a function"):
            client.add_change_listener(None)
        for call, named in [(lambda: client.get_paths("k", pathcount=float("nan")), "pathcount must be"),
                            (lambda: client.get_paths("k", pathcount="2"), "pathcount must be"),
                            (lambda: client.list_keys(42), "prefix must be a str or bytes, not int"),
                            (lambda: client.list_keys("a", after=42), "after must be a str or bytes, not int")]:
            with pytest.raises((TypeError, ValueError), match=named):
                result = call()
                if inspect.isawaitable(result):
                    asyncio.run(result)
        assert tracker.requests == []
    finally:
        tracker.stop()


@both_flavours
def test_change_listeners_hear_every_write_rename_and_delete(devmogile: DevMogileFS, flavour: Flavour) -> None:
    changed: list[str] = []
    also_changed: list[str] = []
    client = flavour.Client(DOMAIN, devmogile.trackers, on_change=changed.append)
    client.add_change_listener(also_changed.append)
    client.store_content("x", b"1", cls="thumb")
    client.store_file("y", io.BytesIO(b"2"), cls="thumb")
    client.rename("x", "z")
    client.delete("z")
    assert changed == ["x", "y", "x", "z", "z"]
    assert also_changed == changed


def test_a_new_file_tells_the_change_listeners_once_it_commits(devmogile: DevMogileFS) -> None:
    changed: list[str] = []
    client = Client(DOMAIN, devmogile.trackers, on_change=changed.append)
    with client.new_file("y", cls="thumb") as upload:
        upload.write(b"2")
        assert changed == []
    assert changed == ["y"]


class _BrokenBackend(MemoryCache):
    """A shared path cache that is down."""

    def delete(self, key: str) -> None:
        raise ConnectionRefusedError("memcached is down")


@both_flavours
def test_a_failing_listener_or_backend_is_logged_and_the_write_stands(devmogile: DevMogileFS, flavour: Flavour,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    heard: list[str] = []

    def broken(key: str) -> None:
        raise RuntimeError("listener bug")

    client = flavour.Client(DOMAIN, devmogile.trackers, on_change=broken, cache_backend=_BrokenBackend())
    client.add_change_listener(heard.append)
    with caplog.at_level(logging.WARNING, logger="mogile_middleware"):
        assert client.store_content("kept", b"data", cls="thumb") == 4
    assert client.get_file_data("kept") == b"data"
    assert heard == ["kept"]  # the listeners after the failing ones still ran
    messages = [record.getMessage() for record in caplog.records]
    assert any("RuntimeError('listener bug')" in message and "'kept'" in message for message in messages)
    assert any("ConnectionRefusedError('memcached is down')" in message for message in messages)


@both_flavours
def test_a_shared_cache_backend_loses_every_changed_key(devmogile: DevMogileFS, flavour: Flavour) -> None:
    backend = MemoryCache()
    client = flavour.Client(DOMAIN, devmogile.trackers, cache_backend=backend)

    def cache(*keys: str) -> None:
        for key in keys:
            backend.set(entry_key(DOMAIN, key), "paths", time.time(), 60)

    def cached(key: str) -> bool:
        return backend.get(entry_key(DOMAIN, key)) is not None

    cache("x", "y")
    backend.set(entry_key("otherdom", "x"), "paths", time.time(), 60)
    client.store_content("x", b"1", cls="thumb")
    assert not cached("x") and cached("y")
    client.store_file("y", io.BytesIO(b"2"), cls="thumb")
    assert not cached("y")
    cache("x", "z")
    client.rename("x", "z")
    assert not cached("x") and not cached("z")
    cache("z")
    client.delete("z")
    assert not cached("z")
    assert backend.get(entry_key("otherdom", "x")) is not None  # the same key in another domain stays


@both_flavours
def test_a_key_written_as_bytes_reaches_the_listeners_and_the_shared_cache_as_text(devmogile: DevMogileFS,
                                                                                     flavour: Flavour) -> None:
    # The path caches hold keys as text (bytes beyond UTF-8 as surrogate escapes): a listener given
    # the bytes dropped nothing, and every host kept the old paths of a key deleted as bytes.
    changed: list[str] = []
    backend = MemoryCache()
    client = flavour.Client(DOMAIN, devmogile.trackers, on_change=changed.append, cache_backend=backend)
    for key in ("b.txt", "b\udcff"):
        backend.set(entry_key(DOMAIN, key), "paths", time.time(), 60)
    client.store_content(b"b.txt", b"1", cls="thumb")
    client.store_file(b"b\xff", io.BytesIO(b"2"), cls="thumb")
    client.rename(b"b.txt", b"c.txt")
    client.delete(b"c.txt")
    assert changed == ["b.txt", "b\udcff", "b.txt", "c.txt", "c.txt"]
    assert backend.get(entry_key(DOMAIN, "b.txt")) is None
    assert backend.get(entry_key(DOMAIN, "b\udcff")) is None


@both_flavours
def test_admin_creates_domains_and_classes(devmogile: DevMogileFS, flavour: Flavour) -> None:
    admin = Admin(devmogile.trackers)
    admin.create_domain("photos")
    admin.create_class("photos", "original", 2, hashtype="MD5")
    assert admin.get_domains()["photos"] == {"default": 2, "original": 2}
    client = flavour.Client("photos", devmogile.trackers)
    client.store_content("p.jpg", b"jpeg", cls="original")
    assert client.file_info("p.jpg").checksum == "MD5:" + hashlib.md5(b"jpeg").hexdigest()
    # One copy: no replication computes the checksum a file was stored without.
    admin.create_class("photos", "single", 1, hashtype="MD5")
    with Client("photos", devmogile.trackers).new_file("q.jpg", "single", checksum=False) as new:
        new.write(b"jpeg")
    assert client.file_info("q.jpg").checksum is None  # not mogilefsd's placeholder, MISSING


def test_admin_sends_a_replication_policy_as_mogadm_does(devmogile: DevMogileFS) -> None:
    """``mogadm class add --replpolicy``: the development tracker places copies as ``MultipleHosts()``
    alone, and refuses another policy as mogilefsd refuses one it has no module for."""
    admin = Admin(devmogile.trackers)
    admin.create_class(DOMAIN, "spread", 2, replpolicy="MultipleHosts()")
    admin.update_class(DOMAIN, "spread", 3, replpolicy="MultipleHosts()")
    assert admin.get_domains()[DOMAIN]["spread"] == 3
    for change in (lambda: admin.create_class(DOMAIN, "devices", 2, replpolicy="MultipleDevices()"),
                   lambda: admin.update_class(DOMAIN, "spread", 2, replpolicy="MultipleDevices()")):
        with pytest.raises(TrackerError) as refused:
            change()
        assert refused.value.code == "invalid_replpolicy"
        assert re.fullmatch(rf"invalid_replpolicy: the trackers have no replication policy 'MultipleDevices\(\)', for "
                            rf"class '(devices|spread)' of domain '{DOMAIN}'", str(refused.value))
    assert admin.get_domains()[DOMAIN]["spread"] == 3
    assert "devices" not in admin.get_domains()[DOMAIN]


def test_admin_updates_and_deletes_classes_and_domains_and_names_what_the_tracker_refuses(
        devmogile: DevMogileFS) -> None:
    """It had no delete nor update, and its errors named nothing ("domain_exists: That domain already exists")."""
    admin = Admin(devmogile.trackers)
    admin.create_domain("photos")
    admin.create_class("photos", "original", 2)
    admin.update_class("photos", "original", 3, hashtype="MD5")
    assert admin.get_domains()["photos"] == {"default": 2, "original": 3}
    Client("photos", devmogile.trackers).store_content("p.jpg", b"jpeg", cls="original")
    refusals = [
        (lambda: admin.create_domain("photos"), "domain_exists: domain 'photos' exists already"),
        (lambda: admin.create_class("photos", "original", 1),
         "class_exists: class 'original' exists already in domain 'photos'"),
        (lambda: admin.delete_class("photos", "original"),
         "class_has_files: class 'original' of domain 'photos' still has files"),
        (lambda: admin.delete_domain("photos"), "domain_has_files: domain 'photos' still has files"),
        (lambda: admin.update_class("photos", "none", 1),
         "class_not_found: class 'none' is not registered in domain 'photos'"),
        (lambda: admin.delete_domain("nowhere"), "domain_not_found: no domain 'nowhere' on the trackers"),
    ]
    for refused, message in refusals:
        with pytest.raises(TrackerError) as raised:
            refused()
        assert str(raised.value) == message
    # Another code than the commands' for an unknown class or domain: caught as theirs are.
    with pytest.raises(UnregClassError):
        admin.update_class("photos", "none", 1)
    with pytest.raises(UnregDomainError):
        admin.delete_domain("nowhere")
    Client("photos", devmogile.trackers).delete("p.jpg")
    admin.delete_class("photos", "original")
    admin.delete_domain("photos")
    assert "photos" not in admin.get_domains()


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda admin: admin.create_class("d", "c", 1.5), ValueError, "mindevcount must be a whole number from 1 to 255, "
                                                                  "not 1.5"),
    (lambda admin: admin.create_class("d", "c", 10 ** 30), ValueError, "from 1 to 255, not 1000000000000000000000"),
    (lambda admin: admin.update_class("d", "c", True), ValueError, "not True"),
    (lambda admin: admin.create_class("d", "c", 0), ValueError, "not 0"),
    (lambda admin: admin.create_domain(5), TypeError, "domain must be text, not int"),
    (lambda admin: admin.create_domain("a\x00b"), ValueError, "domain must be a name without control characters"),
    (lambda admin: admin.create_class("d", "b\udcff", 1), ValueError, "class must be a name without control"),
    (lambda admin: admin.delete_class("d", ""), ValueError, "class must be a name"),
    (lambda admin: admin.create_class("d", "c", 1, hashtype=5), TypeError, "hashtype must be text"),
    (lambda admin: admin.update_class("d", "c", 1, replpolicy=3), TypeError, "replpolicy must be text, not int"),
    (lambda admin: admin.create_class("d", "c", 1, replpolicy="A()\r\nB"), ValueError,
     "replpolicy must be a name without"),
])
def test_admin_refuses_what_no_tracker_should_be_sent(call: Callable[[Admin], None], error: type[Exception],
                                                      message: str) -> None:
    """A float reached the encoder (``AttributeError``); 10**30 was stored as ``1e+30``, and the
    listing of every domain failed after it; a NUL or ``5`` made a domain."""
    tracker = ScriptedTracker(lambda line: pytest.fail(f"sent {line!r}"))
    try:
        with pytest.raises(error, match=re.escape(message)):
            call(Admin([tracker.tracker]))
    finally:
        tracker.stop()


def test_admin_closes_its_tracker_connection_as_a_client_does() -> None:
    """It had no close: its connection stayed open until the collector took the object."""
    class Tracker(ScriptedTracker):
        left = threading.Event()

        def _serve(self, conn: socket.socket) -> None:
            super()._serve(conn)  # until the client closes
            self.left.set()

    tracker = Tracker(lambda line: b"OK domains=1&domain1=d&domain1classes=0\r\n")
    try:
        admin = Admin([tracker.tracker])
        assert admin.get_domains() == {"d": {}}
        assert not tracker.left.wait(0.2)  # kept open for the next command
        admin.close()
        assert tracker.left.wait(5)
    finally:
        tracker.stop()


@pytest.mark.parametrize(("stored", "read"), [("1e%2B30", int(1e30)), ("1.5", 2), ("3", 3)])
def test_a_class_count_the_tracker_stored_as_a_float_leaves_the_listing_readable(stored: str, read: int) -> None:
    """mogilefsd keeps what ``create_class`` was given: another client's ``1e+30`` made every
    listing fail ("no tracker answered"), this client's uploads and caches with it."""
    reply = f"OK domains=1&domain1=d&domain1classes=1&domain1class1name=c&domain1class1mindevcount={stored}\r\n"
    tracker = ScriptedTracker(lambda line: reply.encode())
    try:
        assert Admin([tracker.tracker]).get_domains() == {"d": {"c": read}}
    finally:
        tracker.stop()


@both_flavours
def test_one_thousand_get_paths_open_one_connection(devmogile: DevMogileFS, flavour: Flavour, client: Client) -> None:
    client.store_content("hot", b"x", cls="thumb")
    relay = CountingRelay(devmogile.tracker_address)
    try:
        counted = flavour.Client(DOMAIN, [relay.tracker])
        for _ in range(1000):
            assert counted.get_paths("hot")
        assert relay.connections == 1
    finally:
        relay.stop()


def test_failover_to_the_second_tracker_and_dead_time(devmogile: DevMogileFS, client: Client,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client.store_content("fo", b"x", cls="thumb")
    first = CountingRelay(devmogile.tracker_address)
    second = CountingRelay(devmogile.tracker_address)
    now = [0.0]
    dials: list[tuple[str, int]] = []
    real_connect = socket.create_connection

    def counting_connect(address, *args, **kwargs):
        dials.append(tuple(address))
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counting_connect)
    try:
        failing = Client(DOMAIN, [first.tracker, second.tracker], dead_seconds=30)
        failing.pool._clock = lambda: now[0]
        assert failing.get_paths("fo")
        first.stop()
        for _ in range(20):
            assert failing.get_paths("fo")
            now[0] += 1
        assert dials.count(first.address) == 2  # the first connect, and the failed one
        now[0] += 10  # past the dead time: dialled again (still refused), then skipped again
        assert failing.get_paths("fo")
        assert dials.count(first.address) == 3
    finally:
        first.stop()
        second.stop()


class _DroppingStorageNode(BaseHTTPRequestHandler):
    """A storage node that reads part of a PUT body and hangs up."""

    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(1000)
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def dropping_node():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DroppingStorageNode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _scripted_open(destinations: list[str]) -> ScriptedTracker:
    """A tracker whose create_open offers ``destinations`` (device URLs, ``http://host:port/devN``)
    in that order, as devids 1, 2, ..., and accepts create_close."""
    def script(line: bytes) -> bytes:
        if line.startswith(b"create_open"):
            pairs = "&".join(f"devid_{n}={n}&path_{n}={url}/0/000/000/0000000007.fid"
                             for n, url in enumerate(destinations, 1))
            return f"OK fid=7&dev_count={len(destinations)}&{pairs}\r\n".encode()
        return b"OK \r\n"
    return ScriptedTracker(script)


@both_flavours
def test_upload_falls_back_to_the_next_destination(devmogile: DevMogileFS, flavour: Flavour,
                                                  dropping_node: str) -> None:
    refusing = f"http://127.0.0.1:{devmogile.nodes[0].port}"
    devmogile.nodes[0].stop()
    good = devmogile.nodes[1].url.rstrip("/") + "/dev2"  # the second node's device
    tracker = _scripted_open([refusing + "/dev1", dropping_node + "/dev2", good])
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker])
        payload = bytes(range(256)) * 400
        client.store_file("fallback", io.BytesIO(payload), cls="thumb")
        close = [line for line in tracker.requests if line.startswith(b"create_close")]
        assert len(close) == 1 and b"devid=3" in close[0] and f"size={len(payload)}".encode() in close[0]
        assert f"checksum=MD5%3A{hashlib.md5(payload).hexdigest()}".encode() in close[0]
    finally:
        tracker.stop()


@both_flavours
@pytest.mark.parametrize("second", ["dropping", "refusing"])
def test_an_upload_every_destination_dropped_names_each(flavour: Flavour, dropping_node: str, second: str) -> None:
    """A node that refused after one that dropped the PUT: the blocking upload named only the last."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{unused.getsockname()[1]}"
    tracker = _scripted_open([dropping_node + "/dev1", (dropping_node if second == "dropping" else refusing) + "/dev2"])
    try:
        with pytest.raises(UploadError) as raised:
            flavour.Client(DOMAIN, [tracker.tracker]).store_file("dropped", io.BytesIO(bytes(300_000)), cls="thumb")
        assert "/dev1/" in str(raised.value) and "/dev2/" in str(raised.value)
        assert not any(line.startswith(b"create_close") for line in tracker.requests)
    finally:
        tracker.stop()


def test_a_dropped_put_of_a_stream_fails_without_create_close(dropping_node: str) -> None:
    tracker = _scripted_open([dropping_node + "/dev1"])
    try:
        client = Client(DOMAIN, [tracker.tracker])
        with pytest.raises(UploadError, match="dropped|failed"):
            with client.new_file("stream") as upload:
                for _ in range(100):
                    upload.write(b"x" * 65536)
        assert not any(line.startswith(b"create_close") for line in tracker.requests)
    finally:
        tracker.stop()


@both_flavours
@pytest.mark.parametrize(
    ("error_line", "code"),
    [
        pytest.param(b"ERR size_mismatch Expected:+5%3B+actual:+3\r\n", "size_mismatch", id="size"),
        pytest.param(b"ERR checksum_mismatch Expected:+MD5:00%3B+actual:+MD5:11\r\n", "checksum_mismatch",
                     id="checksum"),
    ],
)
def test_a_rejected_create_close_is_an_upload_error_naming_the_cause(devmogile: DevMogileFS, flavour: Flavour,
                                                                     error_line: bytes, code: str) -> None:
    path = devmogile.nodes[0].url.rstrip("/") + "/dev1/0/000/000/0000000007.fid"

    def script(line: bytes) -> bytes:
        if line.startswith(b"create_open"):
            return f"OK fid=7&devid=1&path={path}\r\n".encode()
        return error_line

    tracker = ScriptedTracker(script)
    try:
        with pytest.raises(UploadError, match=code) as raised:
            flavour.Client(DOMAIN, [tracker.tracker]).store_content("sized", b"123")
        assert raised.value.__cause__.code == code
    finally:
        tracker.stop()


def test_a_file_read_as_wide_items_is_stored_as_its_bytes(devmogile: DevMogileFS) -> None:
    """A memoryview of 4-byte items was sent with its item count as the chunk's length."""
    class Wide(io.RawIOBase):
        def __init__(self) -> None:
            self.left = [memoryview(array.array("I", range(250)))]

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> memoryview | bytes:  # type: ignore[override]
            return self.left.pop() if self.left else b""

    client = Client(DOMAIN, devmogile.trackers)
    assert client.store_file("wide", Wide(), cls="thumb") == 1000
    assert client.get_file_data("wide") == array.array("I", range(250)).tobytes()


@both_flavours
def test_a_replica_of_another_fid_is_never_read_as_the_keys(flavour: Flavour) -> None:
    """A tracker listing a replica of fid 8 after fid 7's, which failed: read_file, get_file_data,
    ``get``, ``cp`` and the Django storage gave fid 8's bytes as the key's, and ``cp`` stored them."""
    other = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nOTHER-FILE")
    dead = f"http://127.0.0.1:{free_port()}/dev1/0/000/000/0000000007.fid"
    tracker = files_tracker({"k": (7, 10, [dead, other.url(8)])})
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker])
        for read in (client.get_file_data, lambda key: client.read_file(key).read()):
            with pytest.raises(StorageError, match="0000000007.fid"):
                read("k")
        assert other.requests == []
    finally:
        tracker.stop()
        other.stop()


@both_flavours
def test_a_tracker_listing_more_paths_than_asked_for_is_read_for_as_many(flavour: Flavour) -> None:
    """Each listed path was tried in turn: 1,000 silent nodes cost 1,000 storage timeouts."""
    failing = KeptAliveNode(lambda head: b"HTTP/1.0 500 Oops\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    urls = [failing.url(7).replace("/dev1/", f"/dev{n}/") for n in range(1, 101)]
    tracker = files_tracker({"k": (7, 10, urls)})
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker])
        assert client.get_paths("k") == urls[:2] and client.get_paths("k", pathcount=3) == urls[:3]
        with pytest.raises(StorageError):
            client.get_file_data("k")
        assert len(failing.requests) == 2
    finally:
        tracker.stop()
        failing.stop()


@both_flavours
def test_a_listing_whose_pages_do_not_move_on_ends(flavour: Flavour) -> None:
    """A tracker giving the same full page again: keys(), ls, rm --prefix, get -r and Django's
    listdir asked for ever (rm's memory growing 11 MB/s), the page's keys given each time."""
    page = [f"p/{n:04d}" for n in range(Client.keys_page)]  # a full page: more may follow
    answer = (f"OK key_count={len(page)}&next_after={page[-1]}&"
              + "&".join(f"key_{n}={key}" for n, key in enumerate(page, 1)) + "\r\n").encode()
    # The tenth request is refused: a client that would ask for ever fails the test instead.
    tracker = ScriptedTracker(lambda line: answer if len(tracker.requests) < 10 else b"ERR failure enough\r\n")
    try:
        client = flavour.Client(DOMAIN, [tracker.tracker])
        given: list[str] = []
        with pytest.raises(ProtocolError, match="do not move on"):
            given.extend(client.keys("p/"))
        assert given == page and len(tracker.requests) <= 3
    finally:
        tracker.stop()
