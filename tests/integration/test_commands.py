"""The everyday subcommands against the embedded MogileFS: round trips, exit codes, progress bar."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import io
import os
import random
import resource
import select
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import DOMAIN
from integration._memcached import start_memcached
from integration._wire_client import LineClient, upload
from webob import Request
from wiretools import TEN, KeptAliveNode, ScriptedTracker, files_tracker, honest

from mogile_middleware import Admin, Client, MogileFSError
from mogile_middleware import upload as upload_module
from mogile_middleware.cache import entry_key
from mogile_middleware.cli.signals import InterruptibleReader
from mogile_middleware.cli import commands, main
from mogile_middleware.cli.serve import FileIndex
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.exceptions import StorageError
from mogile_middleware.memcache import MemcachedBackend
from mogile_middleware.cli.progress import ProgressBar, human_size, printable
from mogile_middleware.storage import ReplicaResponse
from mogile_middleware.tracker import TrackerPool

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    """What one in-process run of the command line gave."""

    code: int
    out: bytes
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines()


Run = Callable[..., Result]


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(devmogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]) -> Run:
    """Runs ``mogile-middleware ARGS...`` in-process against the fixture's tracker and domain."""
    monkeypatch.setenv("MOGILEFS_TRACKERS", devmogile.trackers[0])
    monkeypatch.setenv("MOGILEFS_DOMAIN", DOMAIN)
    monkeypatch.delenv("MOGILEFS_MEMCACHED", raising=False)
    monkeypatch.delenv("MOGILEFS_MEMCACHED_SECRET", raising=False)

    def run(*argv: str) -> Result:
        code = main(list(argv))
        out, err = capsysbinary.readouterr()
        return Result(code, out, err.decode())

    return run


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory tree: nested directories, a name with a space and non-ASCII, an empty file."""
    root = tmp_path / "tree"
    files = {
        "index.html": b"<h1>hello</h1>\n",
        "assets/img/logo.bin": random.Random(1).randbytes(300_000),  # several chunks
        "docs/café menu.txt": "Café crème\n".encode(),
        "docs/empty": b"",
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def contents(root: Path, prefix: str) -> dict[str, bytes]:
    return {prefix + path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def subprocess_env(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOGILEFS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**env, **variables}


@contextlib.contextmanager
def unused_address() -> Iterator[str]:
    """A loopback address where nothing listens: bound (so no one else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# -- round trips ------------------------------------------------------------------------------


def test_a_directory_tree_round_trips(cli: Run, tree: Path, tmp_path: Path) -> None:
    expected = contents(tree, "site/")
    uploaded = cli("upload", "site/", str(tree), "--recursive", "--class", "avatar")
    assert uploaded.code == 0, uploaded.err
    assert dict(line.split("\t")[::-1] for line in uploaded.lines) == {
        key: str(len(data)) for key, data in expected.items()
    }
    assert cli("upload", "elsewhere", str(tree / "index.html")).code == 0

    assert cli("ls", "site/").lines == sorted(expected)
    assert cli("ls").lines == sorted([*expected, "elsewhere"])
    menu = "site/docs/café menu.txt"
    long_listing = [f"{len(expected[menu])}\tavatar\t{menu}", "0\tavatar\tsite/docs/empty"]
    assert cli("ls", "--long", "site/docs/").lines == long_listing
    for key, data in expected.items():
        assert cli("get", key).out == data, key

    key = "site/assets/img/logo.bin"
    assert cli("get", key, "-o", str(tmp_path / "logo.bin")).code == 0
    assert (tmp_path / "logo.bin").read_bytes() == expected[key]
    info = dict(line.split(None, 1) for line in cli("info", key).lines if not line.startswith("path"))
    assert (info["class"], info["length"], info["devcount"]) == ("avatar", "300000", "2")
    paths = cli("paths", key).lines
    assert len(paths) == 2 and all(path.startswith("http://127.0.0.1:") for path in paths)
    with urllib.request.urlopen(paths[0], timeout=5) as response:
        assert response.read() == expected[key]

    assert cli("mv", key, "moved/logo.bin").code == 0
    assert cli("get", "moved/logo.bin").out == expected[key]
    assert cli("get", key).code == 3
    assert cli("rm", "moved/logo.bin").code == 0
    assert cli("info", "moved/logo.bin").code == 3
    assert "moved/logo.bin" not in cli("ls").lines


def test_writes_drop_the_changed_keys_from_memcached(cli: Run, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "file.txt"
    source.write_bytes(b"content")
    with start_memcached() as server:
        backend = MemcachedBackend(server.address)

        def cache(*keys: str) -> None:
            for key in keys:
                backend.set(entry_key(DOMAIN, key), None, time.time(), 60)  # a cached "no such key"

        def cached(key: str) -> bool:
            return backend.get(entry_key(DOMAIN, key)) is not None

        cache("a", "b")
        assert cli("upload", "a", str(source), "--memcached", server.address).code == 0
        assert not cached("a") and cached("b")
        cache("a")
        monkeypatch.setenv("MOGILEFS_MEMCACHED", server.address)  # the default of --memcached
        assert cli("mv", "a", "b").code == 0
        assert not cached("a") and not cached("b")
        cache("b")
        assert cli("rm", "b").code == 0
        assert not cached("b")


def test_writes_sign_their_marks_with_the_sites_memcached_secret(cli: Run, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "file.txt"
    source.write_bytes(b"content")
    with start_memcached() as server:
        site = MemcachedBackend(server.address, secret="the site's secret")
        site.set(entry_key(DOMAIN, "a"), None, time.time(), 60)
        monkeypatch.setenv("MOGILEFS_MEMCACHED_SECRET", "the site's secret")
        assert cli("upload", "a", str(source), "--memcached", server.address).code == 0
        caplog.clear()
        assert site.get(entry_key(DOMAIN, "a")) is None  # the mark of the change: a miss
        assert "invalid memcached entry" not in caplog.text  # signed as the site signs its own


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("MOGILEFS_MEMCACHED_SECRET", "", "MOGILEFS_MEMCACHED_SECRET is set but empty"),
    ("MOGILEFS_MEMCACHED_SECRET", "  ", "MOGILEFS_MEMCACHED_SECRET is set but empty"),
    # Marks under keys no site reads: sites keep the old paths until they expire.
    ("MOGILEFS_MEMCACHED_PREFIX", "", "MOGILEFS_MEMCACHED_PREFIX is set but empty"),
    ("MOGILEFS_MEMCACHED_PREFIX", "two words", "MOGILEFS_MEMCACHED_PREFIX: prefix 'two words' cannot start"),
])
def test_an_empty_memcached_secret_or_prefix_is_a_usage_error_before_any_write(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str,
        problem: str) -> None:
    """Set to nothing (a template's missing value), a secret signed nothing: marks a signing site ignores."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:  # no tracker asked: none listens on port 1
        main(["rm", "k", "--trackers", "127.0.0.1:1", "--domain", DOMAIN, "--memcached", "127.0.0.1:11211"])
    assert stopped.value.code == 2
    assert f"--memcached: {problem}" in capsys.readouterr().err


def test_a_write_told_to_an_unreachable_memcached_stands_and_says_so_in_one_line(devmogile: DevMogileFS,
                                                                                   tmp_path: Path) -> None:
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"
    done = subprocess.run([sys.executable, "-m", "mogile_middleware", "upload", "a", "/dev/null", "--memcached",
                           closed], env=env, capture_output=True, timeout=20, check=False)
    assert done.returncode == 0 and Client(DOMAIN, devmogile.trackers).file_info("a").length == 0
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("mogile-middleware: could not drop 'a' from the shared path cache")


# -- errors -----------------------------------------------------------------------------------


def test_an_unknown_key_is_exit_code_3_naming_the_key(cli: Run) -> None:
    for command in (["get", "no/such"], ["info", "no/such"], ["paths", "no/such"], ["rm", "no/such"],
                    ["mv", "no/such", "other"]):
        result = cli(*command)
        assert (result.code, result.out) == (3, b""), command
        assert result.err == f"mogile-middleware: unknown_key: no key 'no/such' in domain '{DOMAIN}'\n"
    # Named as ls shows it: the escapes of repr were escaped again, "a\\\\b" for the key ls shows "a\\b".
    for key, shown in (("a\\b", "a\\\\b"), ("tab\tx", "tab\\tx"), ("caf\u00e9\u202e", "caf\u00e9\\u202e")):
        for command in ("get", "rm"):  # rm escaped the repr again
            assert cli(command, key).err == f"mogile-middleware: unknown_key: no key '{shown}' in domain '{DOMAIN}'\n"


def test_an_unknown_class_names_the_class_and_the_domain(cli: Run, tree: Path) -> None:
    result = cli("upload", "k", str(tree / "index.html"), "--class", "nosuch")
    assert result.code == 1 and result.err.count("\n") == 1
    assert "nosuch" in result.err and DOMAIN in result.err
    assert cli("ls").lines == []


def test_a_missing_local_file_is_one_line(cli: Run, tmp_path: Path) -> None:
    result = cli("upload", "k", str(tmp_path / "absent"))
    assert result.code == 1
    assert result.err == f"mogile-middleware: {tmp_path / 'absent'}: No such file or directory\n"
    recursive = cli("upload", "k/", str(tmp_path / "absent"), "--recursive")
    assert (recursive.code, recursive.err) == (1, result.err)
    (tmp_path / "file").write_bytes(b"")
    not_a_directory = cli("upload", "k/", str(tmp_path / "file"), "--recursive")
    assert not_a_directory.err == f"mogile-middleware: {tmp_path / 'file'}: Not a directory\n"


def test_a_dead_tracker_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    with unused_address() as address:
        started = time.monotonic()
        assert main(["ls", "--trackers", address, "--domain", DOMAIN]) == 1
        assert time.monotonic() - started < 3
    err = capsys.readouterr().err
    assert err.startswith("mogile-middleware: no tracker answered") and err.count("\n") == 1


@pytest.mark.usefixtures("without_pymemcache")
def test_memcached_without_pymemcache_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["rm", "k", "--trackers", "127.0.0.1:7001", "--domain", DOMAIN, "--memcached", "127.0.0.1:11211"])
    assert stopped.value.code == 2
    assert ("--memcached: mogile_middleware.memcache needs pymemcache: pip install 'mogile_middleware[memcached]' "
            "(import of pymemcache.client.base halted; None in sys.modules)\n") in capsys.readouterr().err


def test_a_missing_domain_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MOGILEFS_DOMAIN", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["ls", "--trackers", "127.0.0.1:7001"])
    assert stopped.value.code == 2
    assert "--domain" in capsys.readouterr().err


def test_get_leaves_no_file_when_the_only_node_is_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with DevMogileFS(tmp_path / "mog", storage_nodes=1, domains={DOMAIN: {"thumb": 1}}) as mogile:
        options = ["--trackers", mogile.trackers[0], "--domain", DOMAIN]
        (tmp_path / "source").write_bytes(b"only copy")
        assert main(["upload", *options, "key", str(tmp_path / "source"), "--class", "thumb"]) == 0
        mogile.nodes[0].stop()
        out = tmp_path / "out"
        out.mkdir()
        assert main(["get", *options, "key", "-o", str(out / "file")]) == 1
    assert list(out.iterdir()) == []
    assert capsys.readouterr().err.startswith("mogile-middleware: 'key': no replica answered")


def interrupt_after_the_first_piece(monkeypatch: pytest.MonkeyPatch,
                                   interrupt: Callable[[ReplicaResponse], None]) -> None:
    """Every replica body calls ``interrupt`` once its first piece is read, then goes on (if it may)."""
    original = ReplicaResponse.iter_chunks

    def interrupted(self: ReplicaResponse, size: int = 65536) -> Iterator[bytes]:
        yield next(original(self, size))
        interrupt(self)
        yield from original(self, size)

    monkeypatch.setattr(ReplicaResponse, "iter_chunks", interrupted)


def previous_file(tmp_path: Path) -> Path:
    """``out/file`` holding what an earlier ``get`` wrote, alone in its directory."""
    target = tmp_path / "out" / "file"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    return target


def test_get_keeps_the_old_file_when_the_transfer_breaks(
    cli: Run, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("upload", "big", str(tree / "assets/img/logo.bin")).code == 0
    original, opened = ReplicaResponse.iter_chunks, []

    def breaking(self: ReplicaResponse, size: int = 65536) -> Iterator[bytes]:
        """The first transfer breaks after a piece; asked again, the replica breaks before any."""
        opened.append(self.url)
        if len(opened) == 1:
            yield next(original(self, size))
        raise StorageError("connection reset midway", self.url)

    monkeypatch.setattr(ReplicaResponse, "iter_chunks", breaking)
    target = previous_file(tmp_path)
    result = cli("get", "big", "-o", str(target))
    assert result.code == 1
    assert re.fullmatch(r"mogile-middleware: 'big': http://\S+\.fid was cut midway: connection reset midway\n",
                        result.err)
    assert list(target.parent.iterdir()) == [target] and target.read_bytes() == b"previous"
    assert len(opened) == 2  # a replica asked again, once: no byte came from it


def test_get_reads_the_rest_from_the_next_replica_when_a_transfer_breaks(
    cli: Run, devmogile: DevMogileFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first replica's transfer breaks after its first piece; the other replica sends the rest
    (a Range from there), and the file is whole."""
    data = random.Random(7).randbytes(1_000_000)
    Client(DOMAIN, devmogile.trackers).store_content("two", data, cls="avatar")
    broken: list[str] = []

    def break_once(replica: ReplicaResponse) -> None:
        if not broken:
            broken.append(replica.url)
            raise StorageError("connection reset midway", replica.url)

    interrupt_after_the_first_piece(monkeypatch, break_once)
    target = tmp_path / "two.bin"
    result = cli("get", "two", "-o", str(target))
    assert (result.code, result.err) == (0, "")
    assert target.read_bytes() == data and len(broken) == 1


RESUMED = random.Random(11).randbytes(300_000)
#: Where the first node cuts its transfer, and so where the rest must start.
CUT_AT = 100_000


class _Node(BaseHTTPRequestHandler):
    """A storage node holding :data:`RESUMED`; the ranges it was asked for go to ``asked``."""

    asked: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802
        self.asked.append(self.headers.get("Range"))
        first, last = self.answered_range()
        self.send_response(206 if (first, last) != (0, len(RESUMED) - 1) else 200)
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(RESUMED)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.send_body(RESUMED[first:last + 1])

    def answered_range(self) -> tuple[int, int]:
        text = self.headers.get("Range")
        if not text:
            return 0, len(RESUMED) - 1
        first, _, last = text.removeprefix("bytes=").partition("-")
        return int(first), int(last)

    def send_body(self, body: bytes) -> None:
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _CuttingNode(_Node):
    """Cuts its first transfer at :data:`CUT_AT`, then sends what it is asked for."""

    asked: list[str | None] = []

    def send_body(self, body: bytes) -> None:
        if len(self.asked) > 1:
            super().send_body(body)
            return
        self.wfile.write(body[:CUT_AT])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


class _MisplacedRangeNode(_Node):
    """Answers a range with a 206 of the right length, but from the file's first byte."""

    asked: list[str | None] = []

    def answered_range(self) -> tuple[int, int]:
        first, last = super().answered_range()
        return 0, last - first


def test_get_resumes_from_the_byte_it_broke_at_and_refuses_a_range_answered_from_elsewhere(
        tmp_path: Path) -> None:
    """The first replica cuts its transfer; the second answers the Range from the wrong place (a
    206 of the right length): refused; the first, asked again, sends the rest, asked for with a
    Range."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (_CuttingNode, _MisplacedRangeNode)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{server.server_address[1]}/dev{n}/0/000/000/0000000009.fid"
            for n, server in enumerate(servers, 1)]
    tracker = files_tracker({"k": (9, len(RESUMED), urls)})
    try:
        target = tmp_path / "resumed.bin"
        assert main(["get", "--trackers", tracker.tracker, "--domain", DOMAIN, "k", "-o", str(target)]) == 0
    finally:
        tracker.stop()
        for server in servers:
            server.shutdown()
            server.server_close()
    assert target.read_bytes() == RESUMED
    rest = f"bytes={CUT_AT}-{len(RESUMED) - 1}"
    assert (_CuttingNode.asked, _MisplacedRangeNode.asked) == ([None, rest], [rest])


# -- control characters -----------------------------------------------------------------------

#: A key a tracker accepts (no NUL, CR or LF) that would recolour a terminal, ring its bell, break
#: the columns of ``ls --long``, and end with a byte that is not UTF-8 (a raw CSI to some terminals).
HOSTILE_KEY = "red\x1b[31m bell\x07 tab\t del\x7f c1\x9b café \udc9b"
ESCAPED_KEY = "red\\x1b[31m bell\\x07 tab\\t del\\x7f c1\\u009b café \\x9b"  # the C1 character, then the byte
RAW_CONTROLS = [b"\x1b", b"\x07", b"\t", b"\x7f", b"\xc2\x9b", b"\x9b", b"\r"]


def assert_no_raw_controls(text: bytes, allowed: bytes = b"") -> None:
    for raw in RAW_CONTROLS:
        assert raw in allowed or raw not in text, (raw, text)


def test_keys_with_control_characters_are_printed_escaped(cli: Run, devmogile: DevMogileFS, tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content(HOSTILE_KEY, b"12345", cls="thumb")

    listed = cli("ls")
    assert listed.out == ESCAPED_KEY.encode() + b"\n"
    assert_no_raw_controls(listed.out)
    long_listed = cli("ls", "--long")
    assert long_listed.out == f"5\tthumb\t{ESCAPED_KEY}\n".encode()
    assert_no_raw_controls(long_listed.out, allowed=b"\t")  # only the two column separators
    assert long_listed.out.count(b"\t") == 2
    info = cli("info", HOSTILE_KEY)
    assert f"key      {ESCAPED_KEY}\n".encode() in info.out and b"length   5\n" in info.out
    assert_no_raw_controls(info.out)

    (tmp_path / "file").write_bytes(b"data")
    terminal = FakeTerminal()
    with contextlib.redirect_stderr(terminal):
        uploaded = cli("upload", "up\x1b]0;title\x07", str(tmp_path / "file"))
    assert uploaded.out == b"4\tup\\x1b]0;title\\x07\n"
    assert terminal.getvalue().split("\r")[1].startswith("up\\x1b]0;title\\x07 100% 4 B")  # the bar's label
    assert_no_raw_controls(terminal.getvalue().encode(), allowed=b"\r")  # the bar's own, to redraw


def test_a_lost_answer_names_the_key_as_other_lines_do(cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key's escapes were escaped again (``'a\\\\tb'``), as they are not elsewhere."""
    cutting = ScriptedTracker(lambda line: None)  # closes the connection on every request
    monkeypatch.setenv("MOGILEFS_TRACKERS", cutting.tracker)
    try:
        lost = cli("rm", "a\tb")
    finally:
        cutting.stop()
    assert lost.code == 1
    assert lost.err.startswith(f"mogile-middleware: key 'a\\tb' in domain '{DOMAIN}': {cutting.tracker} failed after "
                               "'delete' was sent")


def test_a_hostile_trackers_keys_cannot_forge_lines(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    def script(line: bytes) -> bytes:
        if line.startswith(b"list_keys"):
            return b"OK key_count=2&key_1=a%0D%0Aforged+line%1B%5B2J&key_2=b\r\n"
        return b"ERR unknown_command unknown\r\n"

    tracker = ScriptedTracker(script)
    try:
        assert main(["ls", "--trackers", tracker.tracker, "--domain", DOMAIN]) == 0
    finally:
        tracker.stop()
    out = capsysbinary.readouterr().out
    assert out == b"a\\r\\nforged line\\x1b[2J\nb\n"
    assert_no_raw_controls(out)


def test_printable_escapes_controls_and_doubles_backslashes() -> None:
    assert printable("plain/key.jpg") == "plain/key.jpg"
    assert printable("日本語 café ☃") == "日本語 café ☃"  # printable Unicode as it is
    # A key holding a backslash never shows as another key's escape (as GNU ls --escape shows it).
    assert printable("\\x1b") == "\\\\x1b" and printable("\\xff") != printable("\udcff")
    assert printable("\x00\x1f\x7f\x80\x9f\xa1") == "\\x00\\x1f\\x7f\\u0080\\u009f\xa1"
    # C1's U+0085 and the byte 0x85 that is not UTF-8 were both \x85: two keys shown as one.
    assert (printable("a\x85"), printable("a\udc85")) == ("a\\u0085", "a\\x85")
    # Nor does a key show as another through an invisible or reordering character, or a blank
    # that is not the space (a zero-width space, a right-to-left override, a no-break space).
    assert printable("a\u200bb \u202ec\xa0d") == "a\\u200bb \\u202ec\\u00a0d"
    # Nor those str.isprintable takes for printable: a grapheme joiner, a Hangul filler (blank).
    assert printable("a\u034fb c\u3164d") == "a\\u034fb c\\u3164d"
    assert printable("\n\r\t") == "\\n\\r\\t"
    assert printable("\udcff") == "\\xff"  # an undecodable byte, as the protocol keeps it


# -- the real entry point ---------------------------------------------------------------------


def test_the_entry_point_streams_stdin_and_sets_exit_codes(devmogile: DevMogileFS) -> None:
    command = [sys.executable, "-m", "mogile_middleware"]
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    data = random.Random(2).randbytes(2_000_000)

    def run(*argv: str, stdin: bytes = b"", environment: dict[str, str] = env) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*command, *argv], check=False, input=stdin, env=environment, capture_output=True, timeout=20
        )

    stored = run("upload", "piped", "-", stdin=data)
    assert (stored.returncode, stored.stdout) == (0, b"2000000\tpiped\n"), stored.stderr
    assert run("get", "piped").stdout == data
    assert run("get", "absent").returncode == 3
    no_domain = run("ls", environment=subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0]))
    assert no_domain.returncode == 2 and b"MOGILEFS_DOMAIN" in no_domain.stderr

    # A reader that stops early (as head does) ends the command quietly, without a traceback.
    reader = subprocess.Popen([*command, "get", "piped"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    assert reader.stdout.read(10) == data[:10]
    reader.stdout.close()
    assert reader.wait(timeout=10) == 0
    assert reader.stderr.read() == b""
    reader.stderr.close()

    # A standard stream closed before the command started (Python makes it None) is the error of a
    # closed descriptor, in one line, where the command needs it, and no error where it does not.
    def closed(stream: int, *argv: str) -> tuple[int, str]:
        started = subprocess.run([*command, *argv], check=False, env=env, capture_output=True, timeout=20,
                                 preexec_fn=lambda: os.close(stream))
        return started.returncode, started.stderr.decode()

    assert closed(1, "get", "piped") == (1, "mogile-middleware: stdout: Bad file descriptor\n")
    assert closed(1, "ls") == (1, "mogile-middleware: stdout: Bad file descriptor\n")
    assert closed(0, "upload", "other", "-") == (1, "mogile-middleware: stdin: Bad file descriptor\n")
    assert closed(0, "rm", "--prefix", "piped")[0] == 1  # no terminal to ask on
    assert closed(1, "rm", "piped") == (0, "")
    assert run("ls").stdout == b""


def test_an_upload_from_a_pipe_whose_writer_went_quiet_stops_on_sigterm(devmogile: DevMogileFS) -> None:
    """SIGTERM as stdin's bytes flow, its writer then quiet but there (a stalled ssh, tail -f):
    the command stops at once (143), the key untouched, rather than wait for bytes that may never
    come to fill a buffered read. Five times, as the signal lands anywhere in the copying."""
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    piece = b"x" * 65536
    for _ in range(5):
        reading, writing = os.pipe()
        upload = subprocess.Popen([sys.executable, "-m", "mogile_middleware", "upload", "quiet", "-"], stdin=reading,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(reading)
        try:
            flowing = time.monotonic() + 1.5  # the command starts, then reads as fast as it can
            while time.monotonic() < flowing:
                os.write(writing, piece)
            upload.send_signal(signal.SIGTERM)
            assert upload.wait(timeout=10) == 128 + signal.SIGTERM
            assert upload.stderr is not None and upload.stderr.read() == b""
        finally:
            os.close(writing)
            upload.kill()
            upload.wait()
            if upload.stderr is not None:
                upload.stderr.close()
    assert Client(DOMAIN, devmogile.trackers).list_keys("quiet") == []


def test_stdin_read_while_its_writer_drips_goes_on_with_what_came() -> None:
    """A slow but steady writer (an ``ssh`` on a thin line): a read of stdin for the upload gives
    what came within half a second of its first bytes, rather than wait for the whole piece or
    for a pause that never comes while the storage node drops the PUT that sends it nothing."""
    reading, writing = os.pipe()
    stop = threading.Event()

    def drip() -> None:  # for 4 s at most, then the end
        ends = time.monotonic() + 4
        while not stop.wait(0.05) and time.monotonic() < ends:
            os.write(writing, b"0123456789")
        os.close(writing)

    writer = threading.Thread(target=drip)
    writer.start()
    try:
        with open(reading, "rb", buffering=0) as raw:
            started = time.monotonic()
            piece = InterruptibleReader(raw).read(1024 * 1024)
            took = time.monotonic() - started
    finally:
        stop.set()
        writer.join()
    assert took < 3 and 0 < len(piece) < 600 and set(bytes(piece)) <= set(b"0123456789")


# -- progress bar -----------------------------------------------------------------------------


def test_a_key_the_locale_cannot_show_is_printed_escaped(devmogile: DevMogileFS, tmp_path: Path) -> None:
    # Stored, then a UnicodeEncodeError traceback and exit 1; get -r stopped after one file.
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN, PYTHONIOENCODING="ascii")
    source = tmp_path / "menu.txt"
    source.write_bytes(b"menu")

    def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "mogile_middleware", *argv], env=env, capture_output=True,
                              timeout=20, check=False)

    for key in ("caf\u00e9/menu.txt", "caf\u00e9/carte.txt"):
        stored = run("upload", key, str(source))
        assert (stored.returncode, stored.stderr) == (0, b"")
        # as \u00e9: backslashreplace's \xe9 is how the byte 0xE9 that is not UTF-8 shows, another key
        assert stored.stdout == b"4\t" + key.replace("\u00e9", "\\u00e9").encode() + b"\n"
    fetched = run("get", "caf\u00e9/", "-r", "-o", str(tmp_path / "out"))
    assert (fetched.returncode, fetched.stdout.count(b"\\u00e9")) == (0, 2), fetched.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["carte.txt", "menu.txt"]


def test_with_stderr_closed_an_error_never_lands_in_stdout(devmogile: DevMogileFS) -> None:
    # print(file=sys.stderr) with sys.stderr None wrote the error into stdout, the command's data.
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    done = subprocess.run([sys.executable, "-m", "mogile_middleware", "get", "absent"], env=env, capture_output=True,
                          timeout=20, check=False, preexec_fn=lambda: os.close(2))
    assert (done.returncode, done.stdout) == (3, b"")


@pytest.mark.parametrize("stderr", ["reader gone", "/dev/full"])
def test_a_failing_stderr_loses_the_messages_not_the_work_or_the_exit_code(devmogile: DevMogileFS, stderr: str) -> None:
    """An rm of several keys stopped at its first message (a missing key), exit 0, the rest kept;
    a check of a dead tracker said exit 0."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("present", b"x")
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)

    def run(*argv: str) -> int:
        if stderr == "/dev/full":
            with open(stderr, "w") as full:
                return subprocess.run([sys.executable, "-m", "mogile_middleware", *argv], env=env, stderr=full,
                                      stdout=subprocess.DEVNULL, timeout=20, check=False).returncode
        reader, writer = os.pipe()
        os.close(reader)
        try:
            return subprocess.run([sys.executable, "-m", "mogile_middleware", *argv], env=env, stderr=writer,
                                  stdout=subprocess.DEVNULL, timeout=20, check=False).returncode
        finally:
            os.close(writer)

    assert run("rm", "absent", "present") == 3
    assert list(client.keys()) == []
    with socket.socket() as unheard:  # bound, not listening: connections to it are refused
        unheard.bind(("127.0.0.1", 0))
        assert run("check", "--trackers", "127.0.0.1:%d" % unheard.getsockname()[1]) == 1


def test_a_write_error_names_the_output(devmogile: DevMogileFS, tmp_path: Path) -> None:
    # A full disk said "[Errno 28] No space left on device", naming nothing (/dev/full: every write
    # is ENOSPC; a file size limit makes a file too large at its first kilobyte).
    Client(DOMAIN, devmogile.trackers).store_content("big", b"x" * 300_000)
    Client(DOMAIN, devmogile.trackers).store_content("small", b"x" * 3000)
    env = {name: value for name, value in subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0],
                                                         MOGILEFS_DOMAIN=DOMAIN).items() if name != "PYTHONUNBUFFERED"}

    def get(key: str, output: str, **options: Any) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "mogile_middleware", "get", key, "-o", output], env=env,
                              stderr=subprocess.PIPE, text=True, timeout=20, check=False,
                              **{"stdout": subprocess.DEVNULL, **options})
        return done.returncode, done.stderr

    for key in ("big", "small"):
        assert get(key, "/dev/full") == (1, "mogile-middleware: /dev/full: No space left on device\n")
        (tmp_path / "out").mkdir(exist_ok=True)
        target = tmp_path / "out" / f"{key}.bin"
        limited = get(key, str(target), preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
        assert limited == (1, f"mogile-middleware: {target}: File too large\n") and not list(target.parent.iterdir())
        with open("/dev/full", "wb") as full:  # stdout buffered, its rest flushed again at exit: exit 120
            assert get(key, "-", stdout=full) == (1, "mogile-middleware: stdout: No space left on device\n")
    # The other commands' lines too: after an upload, "No space left on device" read as a full node.
    source = tmp_path / "source.txt"
    source.write_bytes(b"content")
    for command in (["upload", "stored", str(source)], ["ls"], ["info", "small"]):
        with open("/dev/full", "wb") as full:
            done = subprocess.run([sys.executable, "-m", "mogile_middleware", *command], env=env, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=20, check=False)
        assert (done.returncode, done.stderr) == (1, "mogile-middleware: stdout: No space left on device\n")
    assert Client(DOMAIN, devmogile.trackers).get_file_data("stored") == b"content"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["ls", "--help"]])
def test_help_or_a_version_that_stdout_does_not_take_is_an_error_naming_it(argv: list[str]) -> None:
    # As ls --help > /dev/full fails: argparse passed over the write's failure, exit 0.
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-m", "mogile_middleware", *argv], env=subprocess_env(), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=20, check=False)
    assert (done.returncode, done.stderr) == (1, "mogile-middleware: stdout: No space left on device\n")


def test_an_output_fifo_whose_reader_left_is_an_error_naming_it(cli: Run, tmp_path: Path) -> None:
    # Taken for stdout's reader gone (| head): exit 0, not a word.
    assert cli("upload", "big", str(_file(tmp_path / "big.bin", 2_000_000))).code == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def read_a_little() -> None:
        with open(fifo, "rb") as reader:
            reader.read(10)

    reading = threading.Thread(target=read_a_little)
    reading.start()
    done = cli("get", "big", "-o", str(fifo))
    reading.join(10)
    assert (done.code, done.err) == (1, f"mogile-middleware: {fifo}: Broken pipe\n")


def test_a_rename_that_fails_names_the_output_not_the_temporary_file(cli: Run, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("upload", "small", str(_file(tmp_path / "small.bin", 100))).code == 0
    target = tmp_path / "out.bin"
    target.write_bytes(b"before")

    def busy(source: str, destination: object) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), source)  # as a read-only bind mount answers

    monkeypatch.setattr(os, "replace", busy)
    done = cli("get", "small", "-o", str(target))
    assert (done.code, done.err) == (1, f"mogile-middleware: {target}: Device or resource busy\n")
    assert target.read_bytes() == b"before"
    assert [name for name in os.listdir(tmp_path) if name.endswith(".part")] == []


def _file(path: Path, size: int) -> Path:
    path.write_bytes(random.Random(size).randbytes(size))
    return path


def test_upload_recursive_names_each_file_that_makes_no_key_and_stores_nothing(cli: Run, tmp_path: Path) -> None:
    # It stopped at the first such file with "key contains the control byte", naming no file.
    root = tmp_path / "tree"
    root.mkdir()
    for name in ("a.txt", "bad\nname", "z" * 200 + "/" + "z" * 100):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(b"x")
    done = cli("upload", "-r", "up/", str(root))
    assert done.code == 1 and done.out == b""
    assert f"{root}/bad\\nname: key contains the control byte" in done.err
    assert f"{root}/{'z' * 200}/{'z' * 100}: key is 304 bytes long" in done.err
    assert cli("ls", "up/").out == b""


def test_upload_recursive_names_what_it_passes_over(cli: Run, tmp_path: Path) -> None:
    # A FIFO and a link to a directory were passed over without a word: the tree seemed stored whole.
    root = tmp_path / "tree"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.txt").write_bytes(b"a")
    (root / "loop").symlink_to(root)
    (root / "nowhere").symlink_to(root / "gone")
    (root / "cycle").symlink_to(root / "cycle")  # named "a link to nothing" too
    os.mkfifo(root / "pipe")
    done = cli("upload", "-r", "up/", str(root))
    assert done.code == 0 and done.out == b"1\tup/real/a.txt\n"
    assert done.err == (f"mogile-middleware: {root}/loop: a link to a directory: skipped\n"
                        f"mogile-middleware: {root}/cycle: a loop of links: skipped\n"
                        f"mogile-middleware: {root}/nowhere: a link to nothing: skipped\n"
                        f"mogile-middleware: {root}/pipe: not a regular file: skipped\n")


def test_upload_recursive_passes_over_a_file_changed_once_the_tree_was_read_and_stores_the_rest(
        cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process changes the tree while it is stored: a file gone or made a directory stopped
    the upload there (the files after it never tried), and one made a FIFO waited for a writer forever."""
    root = tmp_path / "tree"
    root.mkdir()
    for name in "abcde":
        (root / name).write_bytes(name.encode())
    checked = commands._unstorable

    def then_changed(files: list[tuple[Path, str]]) -> int:  # between the listing and the uploads
        bad = checked(files)
        (root / "b").unlink()
        (root / "c").unlink()
        (root / "c").mkdir()
        (root / "d").unlink()
        os.mkfifo(root / "d")
        return bad

    monkeypatch.setattr(commands, "_unstorable", then_changed)
    done = cli("upload", "-r", "up/", str(root))
    assert (done.code, done.out) == (1, b"1\tup/a\n1\tup/e\n")
    assert done.err == (f"mogile-middleware: {root}/b: No such file or directory: skipped\n"
                        f"mogile-middleware: {root}/c: no longer a regular file: skipped\n"
                        f"mogile-middleware: {root}/d: no longer a regular file: skipped\n"
                        "mogile-middleware: 3 file(s) changed since the tree was read: not stored\n")


def test_upload_recursive_passes_over_a_file_whose_size_changes_while_read_and_stores_the_rest(
        cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log still being written stopped the upload there, the files after it never tried."""
    root = tmp_path / "logs"
    root.mkdir()
    for name in ("a.log", "b.log", "c.log"):
        (root / name).write_bytes(name.encode() * 100)
    sized, growing = upload_module.remaining_size, (root / "b.log").stat().st_ino

    def grown_since(source: Any) -> int | None:  # b.log grows by 10 bytes once its size is read
        size = sized(source)
        if os.fstat(source.fileno()).st_ino == growing:
            with open(root / "b.log", "ab") as appending:
                appending.write(b"0123456789")
        return size

    monkeypatch.setattr(upload_module, "remaining_size", grown_since)
    done = cli("upload", "-r", "logs/", str(root))
    assert (done.code, done.out) == (1, b"500\tlogs/a.log\n500\tlogs/c.log\n")
    assert done.err == (f"mogile-middleware: {root}/b.log: its size changed while it was read: skipped\n"
                        "mogile-middleware: 1 file(s) changed since the tree was read: not stored\n")
    assert cli("ls", "logs/").out == b"logs/a.log\nlogs/c.log\n"


def test_upload_of_a_file_to_a_folder_key_adds_the_files_name_as_cp_does(cli: Run, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The file was stored under the key "up/" itself, which get -r then refused as naming no file."""
    (tmp_path / "small.txt").write_bytes(b"small")
    monkeypatch.chdir(tmp_path)
    assert cli("upload", "up/", "small.txt").out == b"5\tup/small.txt\n"
    assert cli("upload", "up/", str(tmp_path / "small.txt")).out == b"5\tup/small.txt\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"piped")))
    refused = cli("upload", "up/", "-")
    assert (refused.code, refused.err) == (2, "mogile-middleware: upload: KEY ends with / (a folder), and stdin has "
                                              "no name to add: give the whole key\n")
    assert cli("ls", "up").out == b"up/small.txt\n"


def test_upload_recursive_to_an_empty_key_needs_top_level(cli: Run, tmp_path: Path) -> None:
    """An unset variable as KEY stored the tree at the top of the domain, over the keys there."""
    Client(DOMAIN, [os.environ["MOGILEFS_TRACKERS"]]).store_content("index.html", b"precious")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "index.html").write_bytes(b"new")
    assert cli("upload", "-r", "", str(tmp_path / "tree")) == Result(
        2, b"", "mogile-middleware: upload: an empty KEY (give --top-level to store the tree at the top of the domain)\n")
    assert cli("get", "index.html").out == b"precious"
    for wrong in (("-r", "up/"), ("",)):
        assert cli("upload", "--top-level", *wrong, str(tmp_path / "tree")) == Result(
            2, b"", "mogile-middleware: upload: --top-level goes with --recursive and an empty KEY ('')\n")
    assert cli("upload", "-r", "--top-level", "", str(tmp_path / "tree")) == Result(0, b"3\tindex.html\n", "")
    assert cli("get", "index.html").out == b"new"


@pytest.mark.parametrize("argv", [("upload", "-r", "up/", ""), ("upload", "up", ""), ("get", "up/", "-r", "-o", ""),
                                  ("get", "up", "-o", "")], ids=["upload-r", "upload", "get-r", "get"])
def test_an_empty_path_is_a_usage_error_not_the_current_directory(cli: Run, argv: tuple[str, ...],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    # An unset variable made upload -r store the working directory, and get -r write into it.
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "cwd" / "here.txt").write_bytes(b"here")
    with pytest.raises(SystemExit) as exited:
        cli(*argv)
    assert exited.value.code == 2
    assert cli("ls", "up").out == b"" and os.listdir(tmp_path / "cwd") == ["here.txt"]


def test_upload_and_get_draw_a_bar_on_a_terminal_only(cli: Run, tree: Path) -> None:
    logo = str(tree / "assets/img/logo.bin")
    for command in (["upload", "logo", logo], ["get", "logo"]):
        terminal = FakeTerminal()
        with contextlib.redirect_stderr(terminal):
            assert cli(*command).code == 0
        frames = terminal.getvalue().split("\r")  # "", the bars, the blanking, ""
        last_bar, blanking = frames[-3], frames[-2]
        assert last_bar.startswith("logo ") and "100% 293.0 KiB / 293.0 KiB" in last_bar, frames
        assert blanking.strip() == "" and len(blanking) >= len(last_bar.rstrip()) and frames[-1] == ""

        piped = io.StringIO()
        with contextlib.redirect_stderr(piped):
            assert cli(*command).code == 0
        assert piped.getvalue() == ""


def test_get_to_a_terminal_draws_no_bar_over_the_text_it_writes(cli: Run, tree: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("upload", "menu", str(tree / "docs/café menu.txt")).code == 0
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # stdout and stderr the same terminal
    terminal = FakeTerminal()
    with contextlib.redirect_stderr(terminal):
        result = cli("get", "menu")
    assert result.code == 0 and result.out == "Café crème\n".encode() and terminal.getvalue() == ""


def test_the_bar_is_redrawn_at_most_ten_times_a_second() -> None:
    now = [0.0]
    terminal = FakeTerminal()
    with ProgressBar(1000, terminal, label="key", clock=lambda: now[0]) as bar:
        for done in range(0, 1000, 10):
            now[0] += 1 / 64  # exact in binary, so the comparisons with the interval are too
            bar.update(done)
        bar.update(1000)
    drawn = [line for line in terminal.getvalue().split("\r") if line.strip()]
    assert len(drawn) == 16  # the 1st of the 100 updates and every 7th after it (7/64 s >= 0.1 s), then the end
    assert drawn[-1].startswith("key 100% 1000 B / 1000 B")
    assert terminal.getvalue().endswith("\r" + " " * len(drawn[-1]) + "\r")


def test_no_bar_without_a_total() -> None:
    terminal = FakeTerminal()
    with ProgressBar(None, terminal) as bar:
        bar.update(5)
    assert terminal.getvalue() == ""


def test_human_sizes() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 5 * 1024**3)] == ["0 B", "1023 B", "1.0 KiB", "1.5 KiB",
                                                                          "5.0 GiB"]


# -- errors that name what the user gave ------------------------------------------------------

def test_an_unknown_domain_is_named(cli: Run) -> None:
    result = cli("ls", "--domain", "nosuch")
    assert result.code == 1 and "no domain 'nosuch' on the trackers" in result.err


def test_get_into_a_directory_or_a_missing_one_names_the_path_given(cli: Run, tmp_path: Path) -> None:
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    source = tmp_path / "source.txt"
    source.write_bytes(b"content")
    assert cli("upload", "doc", str(source), "--class", "thumb").code == 0
    into_directory = cli("get", "doc", "-o", str(tmp_path))
    assert into_directory.code == 1
    assert f"{tmp_path}: is a directory" in into_directory.err and ".part" not in into_directory.err
    missing = tmp_path / "no" / "file.txt"
    into_missing = cli("get", "doc", "-o", str(missing))
    assert into_missing.code == 1
    assert f"{missing}: No such file or directory" in into_missing.err and ".part" not in into_missing.err
    assert [path.name for path in tmp_path.iterdir()] == ["source.txt"]  # nothing left behind


def run_on_terminal(devmogile: DevMogileFS, *argv: str) -> tuple[int, bytes, str]:
    """``mogile-middleware ARGV`` with a pseudo-terminal as stdout: exit code, what the terminal got, stderr."""
    master, slave = os.openpty()
    env = {**os.environ, "MOGILEFS_TRACKERS": devmogile.trackers[0], "MOGILEFS_DOMAIN": DOMAIN}
    try:
        process = subprocess.run([sys.executable, "-m", "mogile_middleware", *argv], stdout=slave,
                                 stderr=subprocess.PIPE, env=env, timeout=30, cwd=REPO)
        os.set_blocking(master, False)
        shown = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(master, 65536):
                shown += chunk
    finally:
        os.close(master)
        os.close(slave)
    return process.returncode, shown, process.stderr.decode()


def test_binary_content_reaches_a_terminal_only_with_dash(devmogile: DevMogileFS) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("picture.bin", bytes(range(256)) * 16, cls="thumb")
    client.store_content("note.txt", "héllo\n".encode(), cls="thumb")
    code, shown, err = run_on_terminal(devmogile, "get", "picture.bin")
    assert code == 1 and shown == b"" and "'picture.bin' is binary: not written to the terminal" in err
    code, shown, _ = run_on_terminal(devmogile, "get", "picture.bin", "-o", "-")
    assert code == 0 and len(shown) >= 256 * 16
    code, shown, _ = run_on_terminal(devmogile, "get", "note.txt")
    assert code == 0 and shown.replace(b"\r\n", b"\n") == "héllo\n".encode()


def test_devserver_names_the_address_it_cannot_listen_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        process = subprocess.run([sys.executable, "-m", "mogile_middleware", "devserver", "--port", str(port),
                                  "--storage-ports", "0"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert process.returncode == 1
    assert f"devserver: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use" in process.stderr


def test_info_and_paths_of_a_file_that_lost_every_copy(cli: Run, devmogile: DevMogileFS) -> None:
    """What an operator looks at first: both failed (exit 1, "pathcount must be a whole number")."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("lost.bin", b"data", "thumb")
    devid = int(client.get_paths("lost.bin")[0].split("/")[3][len("dev"):])  # http://host:port/devN/...
    with LineClient(devmogile.tracker_address) as tracker:
        tracker.ok("set_state", host=f"stor{devid}", device=devid, state="dead")
    info = cli("info", "lost.bin")
    assert info.code == 0 and dict(line.split(None, 1) for line in info.lines)["devcount"] == "0"
    paths = cli("paths", "lost.bin")
    assert (paths.code, paths.lines) == (0, [])


def test_an_ipv6_host_for_the_development_mogilefs_is_a_usage_error() -> None:
    # It failed to start, saying it could not listen on "::1:7500".
    process = subprocess.run([sys.executable, "-m", "mogile_middleware", "devserver", "--host", "::1"],
                             capture_output=True, text=True, timeout=30, cwd=REPO)
    assert process.returncode == 2
    assert "argument --host: an IPv4 address or a host name, not '::1'" in process.stderr
    with pytest.raises(ValueError, match="listens on IPv4 only"):  # DevMogileFS too, before it binds
        DevMogileFS(host="::1")


def test_a_development_mogilefs_on_a_host_name_names_its_nodes_by_address() -> None:
    """As mogilefsd names hosts by the address they were added with: paths naming ``localhost``
    were reproxied by no nginx without a ``resolver``, and the application streamed every file."""
    with DevMogileFS(host="localhost", domains={DOMAIN: {}}) as mogile:
        client = Client(DOMAIN, mogile.trackers)
        client.store_content("named.txt", b"by address")
        paths = client.get_paths("named.txt")
    assert len(paths) == 2 and {urlsplit(path).hostname for path in paths} == {"127.0.0.1"}


def test_devserver_names_a_data_directory_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    command = ["devserver", "--data", str(tmp_path / "a-file"), "--port", "0", "--storage-ports", "0"]
    process = subprocess.run([sys.executable, "-m", "mogile_middleware", *command], capture_output=True, text=True,
                             timeout=30, cwd=REPO)
    assert process.returncode == 1
    assert process.stderr == f"devserver: cannot start: {tmp_path / 'a-file'}: the data directory is a file\n"


@pytest.mark.parametrize("command", ["devserver", "demo"])
def test_an_empty_data_directory_is_a_usage_error(command: str, tmp_path: Path) -> None:
    # It was taken for the current directory, where the tracker's and the nodes' files were made.
    process = subprocess.run([sys.executable, "-m", "mogile_middleware", command, "--data", ""],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path,
                             env=subprocess_env())
    assert process.returncode == 2 and "argument --data: an empty path" in process.stderr
    assert list(tmp_path.iterdir()) == []


def test_devserver_refuses_a_data_directory_another_one_runs_on(tmp_path: Path) -> None:
    # The second registered its own nodes' ports in the shared metadata: the first one's tracker
    # then sent every client to them, and failed every upload and read once they stopped.
    data = tmp_path / "shared"
    with DevMogileFS(data, domains={DOMAIN: {"thumb": 1}}) as first:
        Client(DOMAIN, first.trackers).store_content("kept.txt", b"kept", "thumb")
        command = ["devserver", "--data", str(data), "--port", "0", "--storage-ports", "0"]
        process = subprocess.run([sys.executable, "-m", "mogile_middleware", *command], capture_output=True,
                                 text=True, timeout=30, cwd=REPO)
        assert process.returncode == 1
        assert process.stderr == f"devserver: cannot start: {data}: in use by another development MogileFS\n"
        client = Client(DOMAIN, first.trackers)
        client.store_content("new.txt", b"new", "thumb")
        assert (client.get_file_data("kept.txt"), client.get_file_data("new.txt")) == (b"kept", b"new")
    with DevMogileFS(data) as again:  # the lock goes with the one that held it
        assert Client(DOMAIN, again.trackers).get_file_data("kept.txt") == b"kept"


def test_a_tracker_given_without_a_port_says_which_was_assumed(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MOGILEFS_TRACKERS", raising=False)
    with socket.socket() as probe:  # 7001 is free here unless a tracker runs: then this test says nothing new
        if probe.connect_ex(("127.0.0.1", 7001)) == 0:
            pytest.skip("a tracker listens on 127.0.0.1:7001")
    for without_port in ("127.0.0.1", "::1", "[::1]"):  # a bare IPv6 address's colons are its own
        assert main(["ls", "--trackers", without_port, "--domain", DOMAIN]) == 1
        assert capsys.readouterr().err.rstrip().endswith("(no port given: 7001 assumed)"), without_port
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    try:
        assert main(["ls", "--trackers", f"127.0.0.1:{dead.getsockname()[1]}", "--domain", DOMAIN]) == 1
        assert "assumed" not in capsys.readouterr().err
    finally:
        dead.close()


def test_trackers_and_domain_work_before_or_after_the_command(
        devmogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    monkeypatch.delenv("MOGILEFS_TRACKERS", raising=False)
    monkeypatch.delenv("MOGILEFS_DOMAIN", raising=False)
    Client(DOMAIN, devmogile.trackers).store_content("placed", b"x", cls="thumb")
    tracker = devmogile.trackers[0]
    for argv in (["--trackers", tracker, "--domain", DOMAIN, "ls"],
                 ["ls", "--trackers", tracker, "--domain", DOMAIN],
                 ["--trackers", tracker, "ls", "--domain", DOMAIN],
                 ["--trackers", "127.0.0.1:1", "ls", "--trackers", tracker, "--domain", DOMAIN]):  # after wins
        assert main(argv) == 0, argv
        assert capsysbinary.readouterr().out == b"placed\n", argv
    with pytest.raises(SystemExit) as usage:
        main(["--trackers", tracker, "ls"])
    assert usage.value.code == 2
    assert b"required: pass --domain or set MOGILEFS_DOMAIN" in capsysbinary.readouterr().err
    monkeypatch.setenv("MOGILEFS_DOMAIN", DOMAIN)
    assert main(["--trackers", tracker, "ls"]) == 0  # the environment fills in what is not given


def test_rm_deletes_several_keys_and_reports_each_missing_one(cli: Run, devmogile: DevMogileFS) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("one", "two", "three"):
        client.store_content(key, b"x", cls="thumb")
    result = cli("rm", "one", "ghost", "two")
    assert result.code == 3 and "no key 'ghost' in domain 'testdom'" in result.err
    assert list(client.keys("")) == ["three"]  # the others went, whatever came between


def test_rm_by_prefix_asks_first_unless_yes(cli: Run, devmogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("logs/a", "logs/b", "logs2/c", "keep"):
        client.store_content(key, b"x", cls="thumb")
    refused = cli("rm", "--prefix", "logs/")  # stdin is no terminal here: nothing to ask, nothing deleted
    assert refused.code == 1 and "pass --yes" in refused.err and "nothing deleted" in refused.err
    monkeypatch.setattr("sys.stdin", TerminalInput("n\n"))
    assert cli("rm", "--prefix", "logs/").code == 1
    assert sorted(client.keys("")) == ["keep", "logs/a", "logs/b", "logs2/c"]
    monkeypatch.setattr("sys.stdin", TerminalInput("y\n"))
    asked = cli("rm", "--prefix", "logs/")
    assert asked.code == 0 and "delete the 2 key(s) starting with 'logs/'? [y/N]" in asked.err
    assert sorted(client.keys("")) == ["keep", "logs2/c"]
    assert cli("rm", "--prefix", "logs", "--yes").code == 0
    assert list(client.keys("")) == ["keep"]
    assert cli("rm").code == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal, and yet nothing to ask about
    nothing = cli("rm", "--prefix", "logs")
    assert (nothing.code, nothing.err) == (0, "mogile-middleware: rm: no key starting with 'logs'\n")
    assert list(client.keys("")) == ["keep"]


def test_rm_deletes_every_key_only_with_all(cli: Run, devmogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch,
                                            capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    # An empty --prefix (an unset variable in a script) deleted the whole domain with --yes.
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("a", "b/c"):
        client.store_content(key, b"x", cls="thumb")
    with pytest.raises(SystemExit) as exited:
        cli("rm", "--prefix", "", "--yes")
    assert exited.value.code == 2 and b"an empty prefix (give --all" in capsysbinary.readouterr().err
    with pytest.raises(SystemExit):
        cli("rm", "--prefix", "a", "--all", "--yes")
    assert sorted(client.keys("")) == ["a", "b/c"]
    monkeypatch.setattr("sys.stdin", TerminalInput("y\n"))
    asked = cli("rm", "--all")
    assert asked.code == 0 and "delete the 2 key(s) of the domain 'testdom'? [y/N]" in asked.err
    assert list(client.keys("")) == []


class TerminalInput(io.StringIO):
    """A stdin that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_cp_copies_the_content_in_the_same_class_or_another(cli: Run, devmogile: DevMogileFS) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    data = bytes(range(256)) * 1000  # several chunks
    client.store_content("original", data, cls="avatar")
    assert cli("cp", "original", "copy").code == 0
    assert cli("cp", "original", "thumbnail", "--class", "thumb").code == 0
    for key, cls in (("copy", "avatar"), ("thumbnail", "thumb")):
        info = client.file_info(key)
        assert (info.length, info.cls) == (len(data), cls)
        assert client.read_file(key).read() == data
    assert client.file_info("original").fid not in (client.file_info("copy").fid, client.file_info("thumbnail").fid)
    missing = cli("cp", "ghost", "other")
    assert missing.code == 3 and "no key 'ghost'" in missing.err
    assert "other" not in list(client.keys(""))


def test_cp_keeps_a_key_of_the_default_class_in_it(cli: Run, devmogile: DevMogileFS) -> None:
    """file_info names the class "default", which mogilefsd refuses by name in create_open."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("plain", b"in the default class")
    assert cli("cp", "plain", "copy").code == 0
    assert cli("upload", "named", "/dev/null", "--class", "default").code == 0
    assert client.file_info("copy").cls == client.file_info("named").cls == "default"


def test_get_writes_through_a_link_keeps_a_files_mode_and_writes_a_pipe_as_it_is(cli: Run, devmogile: DevMogileFS,
                                                                                   tmp_path: Path) -> None:
    """As cp and curl -o do: only a regular file is replaced, and then with its own mode."""
    Client(DOMAIN, devmogile.trackers).store_content("doc", b"the content")
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    private = tmp_path / "private.txt"
    private.write_bytes(b"old")
    private.chmod(0o600)
    assert cli("get", "doc", "-o", str(private)).code == 0
    assert private.read_bytes() == b"the content" and private.stat().st_mode & 0o777 == 0o600
    (tmp_path / "target.txt").write_bytes(b"old")
    (tmp_path / "link").symlink_to(tmp_path / "target.txt")
    assert cli("get", "doc", "-o", str(tmp_path / "link")).code == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target.txt").read_bytes() == b"the content"
    os.mkfifo(tmp_path / "fifo")
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        read = reader.submit((tmp_path / "fifo").read_bytes)
        assert cli("get", "doc", "-o", str(tmp_path / "fifo")).code == 0
        assert read.result(timeout=10) == b"the content"
    assert stat.S_ISFIFO((tmp_path / "fifo").stat().st_mode)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fifo", "link", "private.txt", "target.txt"]


def test_get_refuses_a_file_it_may_not_write_as_cp_does(devmogile: DevMogileFS, tmp_path: Path) -> None:
    """A read-only file was replaced all the same (a new file renamed over it, which the
    directory alone allows): cp, curl -o and a shell's > refuse it. Run so that the file's mode
    refuses it: as root, without the capabilities that pass over a file's mode."""
    Client(DOMAIN, devmogile.trackers).store_content("doc", b"the content")
    (tmp_path / "out").mkdir()
    kept = tmp_path / "out" / "kept.txt"
    kept.write_bytes(b"old")
    kept.chmod(0o444)
    modes_apply = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    done = subprocess.run([*modes_apply, sys.executable, "-m", "mogile_middleware", "get", "doc", "-o", str(kept)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (1, f"mogile-middleware: {kept}: Permission denied\n")
    assert kept.read_bytes() == b"old" and list(kept.parent.iterdir()) == [kept]


def test_get_refuses_to_write_through_a_link_to_nothing_as_cp_does(cli: Run, devmogile: DevMogileFS,
                                                                   tmp_path: Path) -> None:
    """The file was made where the link pointed, out of ``-o DIR`` for ``get -r``."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("doc", b"the content")
    client.store_content("tree/x", b"x")
    tmp_path = tmp_path / "work"
    (tmp_path / "out").mkdir(parents=True)
    (tmp_path / "out" / "x").symlink_to(tmp_path / "outside")
    refused = f"mogile-middleware: {tmp_path}/out/x: a link to nothing, not written through\n"
    for argv in (("get", "doc", "-o", str(tmp_path / "out" / "x")), ("get", "-r", "tree/", "-o", str(tmp_path / "out"))):
        assert (cli(*argv).code, cli(*argv).err) == (1, refused)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["x"]


def test_get_names_the_directory_when_it_alone_refuses_the_new_file(devmogile: DevMogileFS, tmp_path: Path) -> None:
    """The file, writable, was named ("f: Permission denied"): it is made anew in its directory,
    which must be writable too. Run as root without the capabilities that pass over modes."""
    Client(DOMAIN, devmogile.trackers).store_content("doc", b"the content")
    (tmp_path / "out").mkdir()
    kept = tmp_path / "out" / "kept.txt"
    kept.write_bytes(b"old")
    kept.chmod(0o666)
    kept.parent.chmod(0o555)
    modes_apply = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    try:
        done = subprocess.run([*modes_apply, sys.executable, "-m", "mogile_middleware", "get", "doc", "-o", str(kept)],
                              env=env, capture_output=True, text=True, timeout=60)
    finally:
        kept.parent.chmod(0o755)
    assert (done.returncode, done.stderr) == (
        1, f"mogile-middleware: {kept.parent}: Permission denied (to make {kept} anew there)\n")
    assert kept.read_bytes() == b"old" and list(kept.parent.iterdir()) == [kept]


def test_upload_names_a_file_whose_read_fails(cli: Run, tmp_path: Path) -> None:
    """Its error named nothing ("[Errno 5] Input/output error"): with --recursive, which file
    failed was not told. /proc/self/mem, whose first page no process maps, fails as a disk would."""
    failing = "/proc/self/mem"
    assert cli("upload", "k", failing) == Result(1, b"", f"mogile-middleware: {failing}: Input/output error\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"1")
    (tree / "b").symlink_to(failing)
    done = cli("upload", "p/", str(tree), "--recursive")
    assert (done.code, done.err) == (1, f"mogile-middleware: {tree / 'b'}: Input/output error\n")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_stop_signal_during_get_leaves_neither_a_partial_file_nor_a_changed_one(
    cli: Run, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: signal.Signals
) -> None:
    # SIGHUP (the terminal or the ssh session gone) left a hidden .part file of what had come.
    assert cli("upload", "big", str(tree / "assets/img/logo.bin")).code == 0
    interrupt_after_the_first_piece(monkeypatch, lambda replica: os.kill(os.getpid(), stop))
    target = previous_file(tmp_path)

    def ignored(signal_number: int, frame: object) -> None:  # outside the command: the test runs on
        pass

    previous = signal.signal(stop, ignored)
    try:
        assert cli("get", "big", "-o", str(target)).code == 128 + stop
        assert signal.getsignal(stop) is ignored  # the command's handler went with it
    finally:
        signal.signal(stop, previous)
    assert list(target.parent.iterdir()) == [target] and target.read_bytes() == b"previous"


def test_the_help_gives_the_exit_code_of_each_stop_signal() -> None:
    # SIGHUP's 129 was missing from it, though the command exits so.
    done = subprocess.run([sys.executable, "-m", "mogile_middleware", "--help"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=20, check=True)
    exit_codes = done.stdout.partition("exit codes:")[2]
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        assert re.search(rf"\b{128 + stop}\b.*\b{stop.name}\b", exit_codes, re.DOTALL), stop.name


#: ``get`` with a progress bar, its pieces slowed, its exit code written where the test reads it.
_SLOW_GET = """
import sys, time
from mogile_middleware.cli.parser import main
from mogile_middleware.storage import ResumedReplica
fetched = ResumedReplica.iter_chunks
def slowly(*args, **kwargs):
    for chunk in fetched(*args, **kwargs):
        time.sleep(0.05)
        yield chunk
ResumedReplica.iter_chunks = slowly
code = main(sys.argv[2:])
open(sys.argv[1], "w").write(str(code))
sys.exit(code)
"""


def test_a_get_whose_terminal_goes_away_stops_as_for_sighup(devmogile: DevMogileFS, tmp_path: Path) -> None:
    """The terminal closed (an ssh session gone): SIGHUP, then the progress bar's last write failed
    with EIO, which replaced the stop: a traceback (to nowhere) and exit 1."""
    import fcntl
    import pty
    import termios

    Client(DOMAIN, devmogile.trackers).store_content("big", os.urandom(2_000_000))
    target, code = tmp_path / "out" / "big.bin", tmp_path / "code"
    target.parent.mkdir()
    controller, terminal = pty.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    with subprocess.Popen([sys.executable, "-c", _SLOW_GET, str(code), "get", "big", "-o", str(target)], env=env,
                          stdin=terminal, stdout=terminal, stderr=terminal, preexec_fn=own_terminal) as getting:
        os.close(terminal)
        deadline = time.monotonic() + 20
        shown = b""
        while b"%" not in shown and time.monotonic() < deadline:  # the bar is drawn: the transfer is on
            shown += os.read(controller, 4096)
        os.close(controller)
        assert getting.wait(timeout=20) == 128 + signal.SIGHUP
    assert code.read_text() == str(128 + signal.SIGHUP) and os.listdir(target.parent) == []


def test_a_stop_signal_ignored_when_the_command_starts_stays_ignored(
    cli: Run, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nohup`` ignores SIGHUP, a shell SIGINT for a job it starts in the background: the command
    must not take them back."""
    assert cli("upload", "big", str(tree / "assets/img/logo.bin")).code == 0
    interrupt_after_the_first_piece(monkeypatch, lambda replica: os.kill(os.getpid(), signal.SIGHUP))
    target = previous_file(tmp_path)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert cli("get", "big", "-o", str(target)).code == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert target.read_bytes() == (tree / "assets/img/logo.bin").read_bytes()


def test_sigterm_while_an_upload_is_committed_says_the_key_may_point_at_the_new_data(
    cli: Run, devmogile: DevMogileFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It exited 143 without a word, the key holding the new data.
    original = TrackerPool.request

    def stopped_at_create_close(pool: TrackerPool, command: str, *args: Any, **kwargs: Any) -> Any:
        answer = original(pool, command, *args, **kwargs)
        if command == "create_close":
            os.kill(os.getpid(), signal.SIGTERM)  # the answer is on its way when the command is stopped
            time.sleep(1)
        return answer

    monkeypatch.setattr(TrackerPool, "request", stopped_at_create_close)
    (tmp_path / "new").write_bytes(b"new data")
    previous = signal.signal(signal.SIGTERM, lambda signal_number, frame: None)
    try:
        stopped = cli("upload", "commit\\ted", str(tmp_path / "new"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.code == 128 + signal.SIGTERM
    # The key as ls shows it (its backslash doubled), not escaped again by repr.
    assert stopped.err == ("mogile-middleware: stopped while the upload of 'commit\\\\ted' was being committed: the "
                           "key may or may not point at the new data\n")
    assert Client(DOMAIN, devmogile.trackers).get_file_data("commit\\ted") == b"new data"  # here, it does


def test_check_refuses_a_timeout_it_cannot_use_and_reports_a_full_disk_in_one_line(devmogile: DevMogileFS) -> None:
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    for timeout in ("inf", "nan", "0", "-1"):
        refused = subprocess.run([sys.executable, "-m", "mogile_middleware", "check", "--timeout", timeout],
                                 env=env, capture_output=True, timeout=20, check=False)
        assert refused.returncode == 2 and b"--timeout" in refused.stderr and b"Traceback" not in refused.stderr
    with open("/dev/full", "wb") as full:
        written = subprocess.run([sys.executable, "-m", "mogile_middleware", "check", "--json"], env=env,
                                 stdout=full, stderr=subprocess.PIPE, timeout=20, check=False)
    assert written.returncode == 1 and written.stderr.decode().splitlines() == [
        "mogile-middleware: stdout: No space left on device"]


def test_get_recursive_writes_the_keys_under_a_prefix_and_never_outside(cli: Run, devmogile: DevMogileFS,
                                                                         tmp_path: Path) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    contents = {"site/index.html": b"<p>hi</p>", "site/img/logo.png": bytes(range(256)) * 300,
                "site/../escape.txt": b"out", "site//double": b"odd", "site/a\\\\b": b"back", "other/x": b"no"}
    for key, data in contents.items():
        client.store_content(key, data, cls="thumb")
    target = tmp_path / "out"
    result = cli("get", "site", "-o", str(target), "--recursive")
    assert result.code == 1  # some keys named no file inside the directory
    assert sorted(str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()) == [
        "a\\\\b", "img/logo.png", "index.html"]  # a backslash is a file name's own on POSIX
    assert (target / "img" / "logo.png").read_bytes() == contents["site/img/logo.png"]
    assert not (tmp_path / "escape.txt").exists() and result.err.count("skipped") == 2
    assert result.lines == ["4\tsite/a\\\\\\\\b", f"{256 * 300}\tsite/img/logo.png", "9\tsite/index.html"]
    assert cli("get", "site/", "--recursive").code == 2  # no directory given


def test_get_recursive_into_a_file_refuses_it_before_fetching_any_key(cli: Run, devmogile: DevMogileFS,
                                                                     tmp_path: Path) -> None:
    """Each key was fetched, then skipped with "File exists", a line per key."""
    client = Client(DOMAIN, devmogile.trackers)
    for name in ("a", "b", "c"):
        client.store_content(f"g/{name}", b"x")
    (tmp_path / "afile").write_bytes(b"kept")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for output, at_fault, error in [("afile", "afile", "Not a directory"), ("afile/sub", "afile/sub", "Not a directory"),
                                    ("dangling", "dangling", "Not a directory"),
                                    ("dangling/sub", "dangling", "Not a directory"),
                                    ("loop", "loop", "Too many levels of symbolic links")]:
        done = cli("get", "g/", "-r", "-o", str(tmp_path / output))
        assert (done.code, done.out, done.err) == (1, b"", f"mogile-middleware: {tmp_path}/{at_fault}: {error}\n")
    assert (tmp_path / "afile").read_bytes() == b"kept" and not (tmp_path / "nowhere").exists()
    made = cli("get", "g/", "-r", "-o", str(tmp_path / "new" / "deeper"))  # a directory to make is made
    assert made.code == 0 and sorted(path.name for path in (tmp_path / "new" / "deeper").iterdir()) == ["a", "b", "c"]


def test_get_recursive_names_a_key_no_replica_serves_and_goes_on(cli: Run, devmogile: DevMogileFS,
                                                                 tmp_path: Path) -> None:
    # It stopped at the first such key, naming the prefix: the keys after it were never fetched.
    # Its directory is not made either: nothing is written for it.
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("tree/a", "tree/b/gone", "tree/c"):
        client.store_content(key, key.encode(), cls="thumb")
    for url in client.get_paths("tree/b/gone"):  # its only replica gone from its node
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5).close()
    result = cli("get", "tree/", "-o", str(tmp_path / "out"), "--recursive")
    assert result.code == 1 and result.lines == ["6\ttree/a", "6\ttree/c"]
    assert result.err.startswith("mogile-middleware: 'tree/b/gone': ") and result.err.endswith(": skipped\n")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a", "c"]


def test_get_writes_a_file_whose_name_is_as_long_as_the_file_system_allows(cli: Run, devmogile: DevMogileFS,
                                                                          tmp_path: Path) -> None:
    """The temporary file beside it has a shorter name of its own: 255 bytes (a 250-byte segment
    after ``long/``), written alone and among others."""
    name = "n" * 250
    client = Client(DOMAIN, devmogile.trackers)
    for key in (f"long/{name}", "long/short"):
        client.store_content(key, key.encode(), cls="thumb")
    assert cli("get", f"long/{name}", "-o", str(tmp_path / name)).code == 0
    assert (tmp_path / name).read_bytes() == f"long/{name}".encode()
    result = cli("get", "long/", "-o", str(tmp_path / "tree"), "--recursive")
    assert result.code == 0 and result.lines == [f"255\tlong/{name}", "10\tlong/short"]
    assert sorted(path.name for path in (tmp_path / "tree").iterdir()) == [name, "short"]


def test_get_recursive_skips_a_key_that_is_also_a_directory_and_goes_on(cli: Run, devmogile: DevMogileFS,
                                                                         tmp_path: Path) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("tree/a", "tree/a/b", "tree/c"):
        client.store_content(key, key.encode(), cls="thumb")
    result = cli("get", "tree/", "-o", str(tmp_path / "out"), "--recursive")
    assert result.code == 1 and result.lines == ["6\ttree/a", "6\ttree/c"]
    assert result.err.startswith("mogile-middleware: 'tree/a/b': ") and result.err.endswith(": skipped\n")


def test_get_recursive_fetches_every_file_name_upload_recursive_stores(cli: Run, tmp_path: Path) -> None:
    # A tab (a legal byte of a POSIX file name) was stored, then skipped as naming no file.
    root = tmp_path / "tree"
    for name in ("a\tb", "bell\x07", "sub/c\\d", os.fsdecode(b"not-utf8-\xff")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode("utf-8", "surrogateescape"))
    assert cli("upload", "up/", str(root), "--recursive").code == 0
    fetched = cli("get", "up/", "-o", str(tmp_path / "out"), "--recursive")
    assert (fetched.code, fetched.err) == (0, "")
    assert contents(tmp_path / "out", "") == contents(root, "")


def test_get_recursive_writes_file_names_byte_for_byte_under_an_ascii_locale(devmogile: DevMogileFS,
                                                                             tmp_path: Path) -> None:
    """Under ``LC_ALL=C`` without UTF-8 mode, Python's file names are ASCII with escapes: the
    names were encoded for it from UTF-8 text, and ``café.txt`` ended the run in a traceback. The
    upload names each key as ``ls`` does (it showed the bytes of ``é`` as bytes that are not UTF-8)."""
    root, out = tmp_path / "tree", tmp_path / "out"
    root.mkdir()
    for name in (b"caf\xc3\xa9.txt", b"\xe6\x97\xa5.txt", b"not-utf8-\xff"):
        (root / os.fsdecode(name)).write_bytes(name)
    env = subprocess_env(LC_ALL="C", PYTHONUTF8="0", PYTHONIOENCODING="", MOGILEFS_TRACKERS=devmogile.trackers[0],
                         MOGILEFS_DOMAIN=DOMAIN)
    listed = []
    for command in (["upload", "up/", str(root), "--recursive"], ["get", "up/", "-o", str(out), "--recursive"],
                    ["ls", "up/"]):
        process = subprocess.run([sys.executable, "-X", "utf8=0", "-m", "mogile_middleware", *command], env=env,
                                 capture_output=True, timeout=60, cwd=REPO)
        assert (process.returncode, process.stderr) == (0, b"")
        listed.append(sorted(line.rpartition(b"\t")[2] for line in process.stdout.splitlines()))
    shown = sorted([b"up/caf\\u00e9.txt", b"up/not-utf8-\\xff", b"up/\\u65e5.txt"])  # as the locale shows them
    assert listed[0] == listed[1] == listed[2] == shown
    assert contents(out, "") == contents(root, "")
    assert sorted(os.listdir(os.fsencode(out))) == sorted(os.listdir(os.fsencode(root)))


def test_get_recursive_cuts_a_prefix_ending_inside_a_character_as_bytes(cli: Run, devmogile: DevMogileFS,
                                                                          tmp_path: Path) -> None:
    # Cut as text, both keys were written to "a.txt", the second over the first.
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("mc/éa.txt", "mc/Éa.txt"):
        client.store_content(key, key.encode(), cls="thumb")
    fetched = cli("get", os.fsdecode(b"mc/\xc3"), "-o", str(tmp_path / "out"), "--recursive")
    assert (fetched.code, fetched.err) == (0, "")
    assert contents(tmp_path / "out", "") == {os.fsdecode(b"\x89a.txt"): "mc/Éa.txt".encode(),
                                              os.fsdecode(b"\xa9a.txt"): "mc/éa.txt".encode()}


# -- keys the client does not create ------------------------------------------------------------

#: Keys a tracker holds that this client does not create (a line feed, over 255 bytes): stored by
#: the Perl tools or another client. The key after them is one the client stores.
ODD_KEYS = ["odd/a\nb", "odd/" + "d" * 300 + "/f", "odd/" + "k" * 296]


@pytest.fixture
def odd_keys(devmogile: DevMogileFS) -> list[str]:
    """:data:`ODD_KEYS`, stored through the raw tracker protocol before ``odd/z`` (stored by the client)."""
    with LineClient(devmogile.tracker_address) as tracker:
        for key in ODD_KEYS:
            assert upload(tracker, DOMAIN, key, b"odd", "thumb") == b"OK \r\n"
    Client(DOMAIN, devmogile.trackers).store_content("odd/z", b"z", cls="thumb")
    return ODD_KEYS


def test_ls_long_lists_keys_the_client_does_not_create(cli: Run, odd_keys: list[str]) -> None:
    # It named them on stderr as keys it would not ask about, and exited 1.
    listed = cli("ls", "--long", "odd/")
    assert (listed.code, listed.err) == (0, "")
    assert listed.lines == [f"3\tthumb\t{printable(key)}" for key in odd_keys] + ["1\tthumb\todd/z"]


def test_ls_null_prints_keys_as_they_are_for_another_command_and_names_one_holding_a_nul(
        cli: Run, devmogile: DevMogileFS, odd_keys: list[str]) -> None:
    """Escaped one a line, a key with a line feed or a backslash came back to no command as it is."""
    Client(DOMAIN, devmogile.trackers).store_content("odd/back\\slash", b"bs", cls="thumb")
    with LineClient(devmogile.tracker_address) as tracker:
        assert upload(tracker, DOMAIN, "odd/nul\0key", b"nul", "thumb") == b"OK \r\n"
    keys = sorted([*odd_keys, "odd/back\\slash", "odd/z"])
    listed = cli("ls", "--null", "odd/")
    assert listed.code == 1 and listed.out == b"".join(key.encode() + b"\0" for key in keys)
    assert listed.err == "mogile-middleware: 'odd/nul\\x00key': it holds a NUL, which ends a key with --null: skipped\n"
    long_listed = cli("ls", "-0l", "odd/")
    assert long_listed.out.split(b"\0")[:2] == [b"3\tthumb\todd/a\nb", b"2\tthumb\todd/back\\slash"]
    assert [cli("info", key.decode()).code for key in listed.out.split(b"\0")[:2]] == [0, 0]


def test_rm_prefix_deletes_keys_the_client_does_not_create(cli: Run, devmogile: DevMogileFS,
                                                           odd_keys: list[str]) -> None:
    # It named them on stderr as keys it would not send, left them, and exited 1.
    deleted = cli("rm", "--prefix", "odd/", "--yes")
    assert (deleted.code, deleted.err) == (0, "")
    assert list(Client(DOMAIN, devmogile.trackers).keys("odd/")) == []


def test_get_recursive_fetches_keys_the_client_does_not_create_and_skips_names_too_long_for_a_file(
        cli: Run, tmp_path: Path, odd_keys: list[str]) -> None:
    # It skipped the line feed's key as one it would not send.
    fetched = cli("get", "odd/", "-o", str(tmp_path / "out"), "--recursive")
    assert (fetched.code, fetched.lines) == (1, ["3\todd/a\\nb", "1\todd/z"])
    assert fetched.err.splitlines() == [f"mogile-middleware: '{printable(key)}' names no file under {tmp_path / 'out'}: "
                                        "skipped" for key in odd_keys[1:]]
    assert sorted(os.listdir(tmp_path / "out")) == ["a\nb", "z"]
    assert (tmp_path / "out" / "a\nb").read_bytes() == b"odd"


def test_the_serve_index_lists_keys_no_url_serves_without_a_link(devmogile: DevMogileFS, odd_keys: list[str]) -> None:
    with contextlib.closing(Client(DOMAIN, devmogile.trackers)) as client:
        page = Request.blank("/").get_response(FileIndex(client, "/mogilefs/", 10))
    assert page.status_int == 200 and '<li><a href="/mogilefs/odd/z">odd/z</a> 1 bytes, class thumb</li>' in page.text
    assert "<li>odd/a\\nb 3 bytes, class thumb, not served: key contains the control byte LF</li>" in page.text
    assert (f"<li>odd/{'k' * 296} 3 bytes, class thumb, not served: key is 300 bytes long, over the 255 of "
            f"MogileFS&#x27;s schema</li>") in page.text


def test_a_recursive_command_goes_on_when_the_reader_of_its_lines_leaves(devmogile: DevMogileFS,
                                                                         tmp_path: Path) -> None:
    """``| head -1``: the lines of what was done are not the work, which stopped at the second file
    with exit 0, the tree half stored or fetched."""
    source = tmp_path / "many"
    source.mkdir()
    for number in range(30):
        (source / f"{number:02d}.txt").write_bytes(b"%d" % number)
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    command = f"{sys.executable} -m mogile_middleware"
    for run in (f"{command} upload many/ {source} -r", f"{command} get many/ -o {tmp_path / 'out'} -r"):
        done = subprocess.run(["bash", "-c", f"{run} | head -1 >/dev/null; exit ${{PIPESTATUS[0]}}"], env=env,
                              capture_output=True, timeout=120)
        assert (done.returncode, done.stderr) == (0, b""), run
    assert len(list(Client(DOMAIN, devmogile.trackers).keys("many/"))) == 30
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"{number:02d}.txt" for number in range(30)]


def test_get_recursive_never_writes_two_keys_into_one_file(cli: Run, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """Under the prefix "col", "col/x" and "colx" both name the file x: the second replaced the first."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("col/x", b"first", cls="thumb")
    client.store_content("colx", b"second", cls="thumb")
    result = cli("get", "col", "-o", str(tmp_path / "out"), "--recursive")
    assert result.code == 1 and "'colx': its file" in result.err and "holds another key's" in result.err
    assert (tmp_path / "out" / "x").read_bytes() == b"first"


def test_get_to_a_path_ending_with_a_slash_needs_a_directory(cli: Run, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """pathlib reads "file.txt/" as "file.txt": that file was replaced (cp refuses)."""
    Client(DOMAIN, devmogile.trackers).store_content("b", b"new", cls="thumb")
    (tmp_path / "file.txt").write_bytes(b"keep me")
    for output in (tmp_path / "file.txt", tmp_path / "new"):
        for ending in ("/", "/."):
            result = cli("get", "b", "-o", f"{output}{ending}")
            assert result.code == 1 and "Not a directory" in result.err, ending
    assert (tmp_path / "file.txt").read_bytes() == b"keep me" and not (tmp_path / "new").exists()


def test_rm_deletes_a_key_given_and_listed_under_the_prefix_once(cli: Run, devmogile: DevMogileFS) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("dup/1", "dup/2"):
        client.store_content(key, b"x", cls="thumb")
    result = cli("rm", "dup/1", "--prefix", "dup/", "--yes")
    assert (result.code, result.err) == (0, "")  # it said "no key 'dup/1'", exit 3
    assert list(client.keys("dup/")) == []


def test_get_and_cp_pass_over_a_replica_cut_short_on_its_disk(cli: Run, devmogile: DevMogileFS,
                                                              tmp_path: Path) -> None:
    """A replica whose file is shorter than the tracker's length was fetched as the whole file."""
    client = Client(DOMAIN, devmogile.trackers)
    body = bytes(range(256)) * 400
    client.store_content("cut", body, cls="avatar")  # two replicas
    first = client.get_paths("cut")[0]
    damaged = next(node for node in devmogile.nodes if first.startswith(node.url))
    replica = damaged.docroot / first.split("/", 3)[3]
    replica.write_bytes(body[:5000])
    for _ in range(4):  # whichever replica the tracker names first
        assert (cli("get", "cut", "-o", str(tmp_path / "got")).code, (tmp_path / "got").read_bytes()) == (0, body)
        assert cli("cp", "cut", "copy").code == 0 and client.get_file_data("copy") == body


@contextmanager
def _drained(pipe: Path) -> Iterator[bytearray]:
    """The bytes written to the named ``pipe`` by the block, by however many writers one after another."""
    reading, taken, ended = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK), bytearray(), threading.Event()

    def drain() -> None:
        while True:
            select.select([reading], [], [], 0.05)
            try:
                piece = os.read(reading, 1 << 16)
            except BlockingIOError:  # a writer, nothing written yet
                continue
            if piece:
                taken.extend(piece)
            elif ended.is_set():
                return
            else:  # no writer now, maybe one again
                time.sleep(0.01)

    draining = threading.Thread(target=drain, daemon=True)
    draining.start()
    try:
        yield taken
    finally:
        ended.set()
        draining.join(10)
        os.close(reading)


def test_get_reads_past_a_replica_whose_bytes_differ_from_the_checksum_and_refuses_when_none_match(
        cli: Run, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """A replica that rotted on its disk (its length unchanged) was written as the file."""
    client = Client(DOMAIN, devmogile.trackers)
    Admin(devmogile.trackers).create_class(DOMAIN, "summed", 2, hashtype="MD5")
    body = bytes(range(256)) * 400
    for key in ("rotted", "sound"):
        client.store_content(key, body, cls="summed")
    replicas = client.get_paths("rotted")

    def rot(url: str) -> None:
        node = next(node for node in devmogile.nodes if url.startswith(node.url))
        (node.docroot / url.split("/", 3)[3]).write_bytes(body[:5000] + b"X" + body[5001:])

    rot(replicas[0])
    sums = (hashlib.md5(body).hexdigest(), hashlib.md5(body[:5000] + b"X" + body[5001:]).hexdigest())
    said = set()
    for _ in range(20):  # whichever replica the tracker names first: the rotted one about every other time
        got = cli("get", "rotted", "-o", str(tmp_path / "got"))
        assert (got.code, (tmp_path / "got").read_bytes()) == (0, body)
        said.add(got.err)
    assert said == {"", f"mogile-middleware: 'rotted': the content read from {replicas[0]} does not match its "
                        f"checksum MD5:{sums[0]} (MD5:{sums[1]} read): read again from another replica\n"}
    # A pipe (as -o /dev/stdout is) is written as it is: the rotted bytes are out, and exit 1 says
    # so, as to stdout (read again, the file followed them, exit 0).
    os.mkfifo(tmp_path / "pipe")
    outcomes = set()
    for _ in range(20):
        with _drained(tmp_path / "pipe") as taken:
            piped = cli("get", "rotted", "-o", str(tmp_path / "pipe"))
        assert len(taken) == len(body) and (piped.code, taken == body) in {(0, True), (1, False)}
        assert ("does not match its checksum" in piped.err) == (piped.code == 1)
        outcomes.add(piped.code)
    assert outcomes == {0, 1}  # whichever replica the tracker names first
    said = set()
    for number in range(20):  # and so for cp, whose upload would have stored the rotted bytes with their MD5
        copied = cli("cp", "rotted", f"copy{number}")
        assert (copied.code, client.get_file_data(f"copy{number}")) == (0, body)
        said.add(copied.err)
    assert said == {"", f"mogile-middleware: 'rotted': the content read from {replicas[0]} does not match its "
                        f"checksum MD5:{sums[0]} (MD5:{sums[1]} read): read again from another replica\n"}
    client.store_content("copy0", b"before", cls="summed")
    rot(replicas[1])
    refused = cli("cp", "rotted", "copy0")
    assert refused.code == 1 and refused.err.count("does not match its checksum") == 2
    assert client.get_file_data("copy0") == b"before"
    (tmp_path / "got").write_bytes(b"before")
    (tmp_path / "tree").mkdir()
    refused = cli("get", "rotted", "-o", str(tmp_path / "got"))
    assert refused.code == 1 and (tmp_path / "got").read_bytes() == b"before"
    assert refused.err.count("does not match its checksum") == 2
    assert cli("get", "rotted").code == 1  # to stdout: written, and said
    listed = cli("get", "", "-r", "-o", str(tmp_path / "tree"))
    assert listed.code == 1 and "'rotted': the content read from" in listed.err
    written = sorted(path.name for path in (tmp_path / "tree").iterdir())
    assert written == sorted([*(f"copy{number}" for number in range(20)), "sound"])
    assert (tmp_path / "tree" / "sound").read_bytes() == body and not list(tmp_path.glob("**/.*.part"))


@pytest.mark.parametrize("cuts", [1, 2], ids=["cut-once", "cut-twice"])
@pytest.mark.parametrize("rotted_at", [10, 900_000], ids=["before-the-cut", "after-the-cut"])
def test_get_reads_each_replica_alone_when_bytes_that_differ_came_from_two(
        cli: Run, devmogile: DevMogileFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotted_at: int,
        cuts: int) -> None:
    """A transfer cut midway goes on from the other replica: with one of them rotted, the file
    read from both differed, no replica was left unread, and the sound one was never read whole;
    cut twice, it went back to the first, named twice, and no replica was left to read at all."""
    client = Client(DOMAIN, devmogile.trackers)
    Admin(devmogile.trackers).create_class(DOMAIN, "summed", 2, hashtype="MD5")
    body = random.Random(3).randbytes(1_000_000)
    client.store_content("cut", body, cls="summed")
    url = client.get_paths("cut")[0]
    node = next(node for node in devmogile.nodes if url.startswith(node.url))
    (node.docroot / url.split("/", 3)[3]).write_bytes(body[:rotted_at] + b"X" + body[rotted_at + 1:])
    left = [0]

    def cut(replica: ReplicaResponse) -> None:
        if left[0]:
            left[0] -= 1
            raise StorageError("connection reset midway", replica.url)

    interrupt_after_the_first_piece(monkeypatch, cut)
    for _ in range(4):  # whichever replica is read first, and cut
        left[0] = cuts
        got = cli("get", "cut", "-o", str(tmp_path / "got"))
        assert (got.code, (tmp_path / "got").read_bytes()) == (0, body), got.err
        assert all(line.count(url) <= 1 for line in got.err.splitlines())


def test_get_asks_for_the_replicas_the_trackers_did_not_list_when_those_listed_differ(tmp_path: Path) -> None:
    """The trackers list two replicas unless asked for more: of three, the third, sound, was never read."""
    with DevMogileFS(data_dir=tmp_path / "data", storage_nodes=3, domains={DOMAIN: {}}) as mogile:
        Admin(mogile.trackers).create_class(DOMAIN, "summed", 3, hashtype="MD5")
        client = Client(DOMAIN, mogile.trackers)
        body = bytes(range(256)) * 400
        client.store_content("three", body, cls="summed")
        env = subprocess_env(MOGILEFS_TRACKERS=mogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
        for attempt in range(6):  # the tracker lists the replicas in any order: rot those it lists first
            for url in client.get_paths("three")[:2]:
                node = next(node for node in mogile.nodes if url.startswith(node.url))
                (node.docroot / url.split("/", 3)[3]).write_bytes(body[:-1] + b"X")
            done = subprocess.run([sys.executable, "-m", "mogile_middleware", "get", "three", "-o",
                                   str(tmp_path / "got")], env=env, capture_output=True, timeout=60)
            assert (done.returncode, (tmp_path / "got").read_bytes()) == (0, body), done.stderr
            for url in client.get_paths("three", pathcount=3):  # sound again, for the next round
                node = next(node for node in mogile.nodes if url.startswith(node.url))
                (node.docroot / url.split("/", 3)[3]).write_bytes(body)


def test_get_and_cp_of_an_empty_file_whose_checksum_is_wrong_end_at_once(devmogile: DevMogileFS,
                                                                         tmp_path: Path) -> None:
    """No bytes to blame a replica for: ``get`` read the same replicas again, without end (run
    apart, so that it cannot hang the suite), and ``cp`` checked nothing."""
    Admin(devmogile.trackers).create_class(DOMAIN, "summed", 2, hashtype="MD5")
    with LineClient(devmogile.tracker_address) as tracker:
        assert upload(tracker, DOMAIN, "empty", b"", "summed", checksum="MD5:" + "0" * 32) == b"OK \r\n"
    env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
    for command in (["get", "empty", "-o", str(tmp_path / "got")], ["cp", "empty", "copy"]):
        refused = subprocess.run([sys.executable, "-m", "mogile_middleware", *command], env=env, capture_output=True,
                                 text=True, timeout=30)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert "'empty': the content read from no replica (an empty file) does not match" in refused.stderr


def test_cp_checks_a_copy_sent_again_from_the_start_as_a_whole(devmogile: DevMogileFS) -> None:
    """A destination node that drops the copy has it sent again to the next, read again from the
    start: the check must start again with it, or every such copy is refused."""
    client = Client(DOMAIN, devmogile.trackers)
    Admin(devmogile.trackers).create_class(DOMAIN, "summed", 1, hashtype="MD5")
    body = bytes(range(256)) * 400
    client.store_content("sound", body, cls="summed")
    paths, info = client.current_version("sound")
    with commands._CheckedBody(paths, length=len(body), timeout=5,
                               check=commands._ChecksumCheck.of(info.checksum, paths)) as source:
        first = source.read(70000)  # one piece, and the first destination dropped it
        assert first and body.startswith(first) and len(first) < len(body)
        source.seek(0)
        assert source.read() == body
    node = next(node for node in devmogile.nodes if paths[0].startswith(node.url))
    (node.docroot / paths[0].split("/", 3)[3]).write_bytes(body[:-1] + b"X")
    with commands._CheckedBody(paths, length=len(body), timeout=5,
                               check=commands._ChecksumCheck.of(info.checksum, paths)) as source:
        assert body.startswith(source.read(70000))
        source.seek(0)
        with pytest.raises(MogileFSError, match="does not match its checksum"):
            source.read()


def test_upload_recursive_names_each_file_it_cannot_read_and_stores_nothing(devmogile: DevMogileFS) -> None:
    """It stopped at the first, the files before it stored and those after it not tried. Run so
    that the file's mode refuses it: as root (who may read anything), without the capabilities
    that pass over a file's mode."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch, "tree")
        tree.mkdir()
        for name in ("a.txt", "m.txt", "z.txt"):
            (tree / name).write_bytes(name.encode())
        (tree / "m.txt").chmod(0)
        modes_apply = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
        env = subprocess_env(MOGILEFS_TRACKERS=devmogile.trackers[0], MOGILEFS_DOMAIN=DOMAIN)
        done = subprocess.run([*modes_apply, sys.executable, "-m", "mogile_middleware", "upload", "t/", str(tree),
                               "-r"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"{tree / 'm.txt'}: Permission denied\n" in done.stderr and "nothing stored" in done.stderr
    assert list(Client(DOMAIN, devmogile.trackers).keys("t/")) == []


def test_get_reads_the_version_a_key_has_when_it_changes_between_two_questions(tmp_path: Path) -> None:
    """Replaced between ``get_paths`` and ``file_info``: every replica seemed of the wrong length,
    "no replica answered", exit 1, for a key in good health."""
    node = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nold"
                         if b"/0000000001.fid" in head else honest(head))
    asked: list[bytes] = []

    def tracker_script(line: bytes) -> bytes:
        command = line.partition(b" ")[0]
        asked.append(command)
        if command == b"get_paths":  # the old version first, the new one after
            return f"OK paths=1&path1={node.url(1 if asked.count(command) == 1 else 2)}\r\n".encode()
        if command == b"file_info":
            return b"OK fid=2&domain=testdom&class=thumb&key=k&length=10&devcount=1\r\n"
        return b"OK \r\n"

    tracker = ScriptedTracker(tracker_script)
    try:
        target = tmp_path / "k"
        assert main(["get", "--trackers", tracker.tracker, "--domain", DOMAIN, "k", "-o", str(target)]) == 0
        assert target.read_bytes() == TEN
    finally:
        tracker.stop()
        node.stop()
