"""``mogile-middleware serve`` end to end: the real command in front of a development MogileFS,
asked over real HTTP: files, ranges, the index and its links, reproxy and trust, start-up errors."""

from __future__ import annotations

import html
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import pytest
from conftest import DOMAIN, require_module
from webob import Request
from integration._proxies import run_perlbal_front
from integration._wire_client import http_request
from integration.test_commands import subprocess_env, unused_address
from integration.test_demo import child_pids, read_until, stdout_lines

from mogile_middleware import Client
from mogile_middleware.cli import main
from mogile_middleware.cli.serve import FileIndex
from mogile_middleware.devserver import DevMogileFS

require_module("gunicorn")

COMMAND = [sys.executable, "-m", "mogile_middleware"]
#: Seconds for the command to check the trackers, start gunicorn and announce its address.
START_SECONDS = 30
#: Listed by the index (sorted, as the tracker lists them): a %, an &, a space and non-ASCII.
FILES = {
    "100% a&b.txt": b"per cent and ampersand\n",
    "café menu.txt": "Café crème, crêpes.\n".encode(),
    "docs/readme.txt": b"served from MogileFS\n",
    "video.mp4": random.Random(11).randbytes(1_000_000),
}
#: Stored after them, and past the index's ``--index-keys 4``.
UNLISTED = "zz/last.txt"
LISTED = re.compile(r'<li><a href="([^"]+)">([^<]+)</a> (\d+) bytes, class (\w+)</li>')


@pytest.fixture
def stored(devmogile: DevMogileFS) -> DevMogileFS:
    """The development MogileFS with :data:`FILES` and :data:`UNLISTED` stored."""
    client = Client(DOMAIN, devmogile.trackers)
    try:
        for key, content in {**FILES, UNLISTED: b"last\n"}.items():
            client.store_content(key, content, "thumb")
    finally:
        client.close()
    return devmogile


class Served(NamedTuple):
    """A running ``serve``: its process, its base URL and the URL it announced for the files (less ``<key>``)."""

    process: subprocess.Popen[str]
    base: str
    files: str


@contextmanager
def serving(tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """``serve OPTIONS`` with one worker on a port the system picks, once it has announced where;
    whatever is left of its process group is killed afterwards."""
    command = [*COMMAND, "serve", "--bind", "127.0.0.1:0", "--workers", "1", *options]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env or subprocess_env(),
                                   cwd=tmp_path, text=True, start_new_session=True)
    try:
        files, page = read_until(stdout_lines(process), "page ", timeout=START_SECONDS)
        assert files.startswith("files http://127.0.0.1:") and page.startswith("page http://127.0.0.1:"), (files, page)
        assert files.endswith("<key>"), files  # what it prints is no link that answers 404
        yield Served(process, page.removeprefix("page ").removesuffix("/"),
                     files.removeprefix("files ").removesuffix("<key>"))
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def connection(mogile: DevMogileFS, domain: str = DOMAIN) -> list[str]:
    return ["--trackers", mogile.trackers[0], "--domain", domain]


def test_serve_answers_files_and_the_index_then_stops_on_sigterm(stored: DevMogileFS, tmp_path: Path) -> None:
    with serving(tmp_path, *connection(stored), "--index-keys", "4") as (process, base, files):
        assert files == f"{base}/mogilefs/"
        readme = http_request(f"{base}/mogilefs/docs/readme.txt")
        assert (readme.status, readme.body) == (200, FILES["docs/readme.txt"])
        assert readme.headers["content-type"] == "text/plain; charset=utf-8"
        assert readme.headers["content-length"] == str(len(FILES["docs/readme.txt"]))
        assert readme.headers["accept-ranges"] == "bytes" and readme.headers["etag"]

        video = FILES["video.mp4"]
        whole = http_request(f"{base}/mogilefs/video.mp4")
        head = http_request(f"{base}/mogilefs/video.mp4", method="HEAD")
        assert (head.status, head.body, head.headers["content-length"]) == (200, b"", str(len(video)))
        assert head.headers["etag"] == whole.headers["etag"] and whole.body == video
        ranged = http_request(f"{base}/mogilefs/video.mp4", headers={"Range": "bytes=1000-250999"})
        assert (ranged.status, ranged.headers["content-range"]) == (206, f"bytes 1000-250999/{len(video)}")
        assert ranged.body == video[1000:251000]

        assert http_request(f"{base}/mogilefs/absent.txt").status == 404
        assert http_request(f"{base}/elsewhere").status == 404

        index = http_request(f"{base}/")
        assert index.status == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
        page = index.body.decode()
        listed = LISTED.findall(page)
        assert [html.unescape(name) for _, name, _, _ in listed] == list(FILES)
        for href, name, size, cls in listed:
            key = html.unescape(name)
            assert html.unescape(href) == "/mogilefs/" + quote(key) and cls == "thumb"
            reply = http_request(base + html.unescape(href))
            assert (reply.status, reply.body, int(size)) == (200, FILES[key], len(FILES[key])), key
        assert "Only the first 4 keys are listed." in page and UNLISTED not in page

        workers = child_pids(process.pid)
        assert len(workers) == 1, workers
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a gunicorn worker outlived serve"
    # Serve mode was given the proxies' options, and said at start that it ignored them.
    assert "ignored" not in (tmp_path / "stderr.txt").read_text()


def test_the_index_lists_a_key_no_url_serves_without_a_link(devmogile: DevMogileFS) -> None:
    # A key of bytes that are not UTF-8 (list_keys gives them as surrogate escapes) made the
    # whole page fail: the middleware answers such a path with a 400, so it gets no link.
    client = Client(DOMAIN, devmogile.trackers)
    try:
        client.store_content("a.txt", b"a", "thumb")
        client.store_content(b"b\xff.bin", b"bb", "thumb")
        client.store_content("c/../a.txt", b"ccc", "thumb")  # a browser would ask for a.txt
        client.store_content("d\tx.txt", b"dddd", "thumb")  # the middleware answers 400
        client.store_content("e\u202etxt.exe", b"eeeee", "thumb")  # shown as exe.txt, but for its escape
        page = Request.blank("/").get_response(FileIndex(client, "/mogilefs/", 10))
    finally:
        client.close()
    assert page.status_int == 200
    assert '<li><a href="/mogilefs/a.txt">a.txt</a> 1 bytes, class thumb</li>' in page.text
    assert '<a href="/mogilefs/e%E2%80%AEtxt.exe">e\\u202etxt.exe</a> 5 bytes' in page.text
    assert ("<li>b\\xff.bin 2 bytes, class thumb, not served: key &#x27;b\\udcff.bin&#x27; is not UTF-8: no URL "
            "names it</li>") in page.text
    assert ("<li>c/../a.txt 3 bytes, class thumb, not linked: &#x27;c/../a.txt&#x27; has a &#x27;..&#x27; segment, "
            "which clients remove from a URL: its link would name another key</li>") in page.text
    assert ("<li>d\\tx.txt 4 bytes, class thumb, not linked: &#x27;d\\tx.txt&#x27; holds the control character "
            "&#x27;\\t&#x27;, which the middleware answers with a 400: no link serves it</li>") in page.text


def test_an_index_of_one_key_says_so_in_the_singular(stored: DevMogileFS) -> None:
    # "Only the first 1 keys are listed."
    client = Client(DOMAIN, stored.trackers)
    try:
        page = Request.blank("/").get_response(FileIndex(client, "/mogilefs/", 1)).text
    finally:
        client.close()
    assert "<p>Only the first key is listed.</p>" in page


@pytest.mark.parametrize(("prefix", "sent"), [("/media/", "/media/"), ("/m%C3%A9dias/", "/m%C3%A9dias/"),
                                            ("/médias/", "/m%C3%A9dias/"),
                                            ("/a%2541/", "/a%2541/")])  # decoded twice, every link was a 404
def test_a_prefix_moves_the_files_and_the_links(stored: DevMogileFS, tmp_path: Path, prefix: str, sent: str) -> None:
    env = subprocess_env(MOGILEFS_TRACKERS=stored.trackers[0], MOGILEFS_DOMAIN=DOMAIN)  # from the environment
    with serving(tmp_path, "--prefix", prefix, env=env) as (_, base, files):
        assert files == f"{base}{sent}"
        assert http_request(f"{base}{sent}docs/readme.txt").body == FILES["docs/readme.txt"]
        assert http_request(f"{base}/mogilefs/docs/readme.txt").status == 404
        page = http_request(f"{base}/").body.decode()
        assert f'<a href="{sent}{quote("café menu.txt")}">' in page and "Only the first" not in page


def test_the_packages_warnings_are_logged_as_gunicorn_logs_its_own(stored: DevMogileFS, tmp_path: Path) -> None:
    """A tracker down of two: said by the master (which checks the domain) and by the worker that
    met it, each with the time, its process and the level, as gunicorn's lines around them."""
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))
        trackers = f"127.0.0.1:{down.getsockname()[1]},{stored.trackers[0]}"
        with serving(tmp_path, "--trackers", trackers, "--domain", DOMAIN) as (process, base, files):
            assert http_request(f"{files}docs/readme.txt").status == 200
            workers = child_pids(process.pid)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
    down_tracker = re.escape(trackers.split(",")[0])
    line = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[(\d+)\] \[WARNING\] tracker "
                      rf"{down_tracker} failed \(\[Errno 111\] Connection refused\): not asked for 5s")
    logged = [int(match[1]) for match in map(line.fullmatch, (tmp_path / "stderr.txt").read_text().splitlines()) if match]
    assert logged == [process.pid, *workers]


def test_the_index_says_when_the_trackers_have_gone(stored: DevMogileFS, tmp_path: Path) -> None:
    with serving(tmp_path, *connection(stored)) as (_, base, _):
        assert http_request(f"{base}/").status == 200
        stored.stop_tracker()
        gone = http_request(f"{base}/")
        assert gone.status == 503 and b"no tracker answered" in gone.body


@pytest.mark.parametrize(("trust", "reproxied"), [
    pytest.param([], True, id="loopback-trusted-by-default"),
    pytest.param(["--trusted-proxy", "192.0.2.1"], False, id="only-the-proxy-given"),
])
def test_perlbal_reproxy_reaches_trusted_proxies_only(stored: DevMogileFS, tmp_path: Path, trust: list[str],
                                                       reproxied: bool) -> None:
    content = FILES["café menu.txt"]
    path = "/mogilefs/" + quote("café menu.txt")
    with serving(tmp_path, *connection(stored), "--reproxy", "perlbal", *trust) as (_, base, _):
        # A browser on the proxy's machine gets the file: it sent an empty body and storage URLs.
        browser = http_request(base + path)
        assert (browser.status, browser.body) == (200, content)
        assert not [name for name in browser.headers if name.startswith("x-reproxy")]
        asking = http_request(base + path, headers={"X-Proxy-Capabilities": "reproxy-file"})
        assert asking.status == 200
        if reproxied:  # this client, on loopback and asking as Perlbal does, may be the proxy
            assert asking.body == b"" and asking.headers["content-type"] == "text/plain; charset=utf-8"
            replicas = asking.headers["x-reproxy-url"].split()
            assert replicas and all(http_request(url).body == content for url in replicas)
        else:
            assert asking.body == content and not [name for name in asking.headers if name.startswith("x-reproxy")]
        with run_perlbal_front(int(base.rpartition(":")[2])) as perlbal:  # what a user behind Perlbal sees
            proxied = http_request(f"http://127.0.0.1:{perlbal.port}{path}")
        assert (proxied.status, proxied.body) == (200, content)
        assert not [name for name in proxied.headers if name.startswith("x-reproxy")]


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_trusted_proxy_without_reproxy_is_refused_before_anything_starts(command: str) -> None:
    """Serve mode trusts no proxy: the address was dropped without a word."""
    connection = ["--trackers", "127.0.0.1:1", "--domain", DOMAIN] if command == "serve" else []  # none asked
    done = subprocess.run([sys.executable, "-m", "mogile_middleware", command, "--trusted-proxy", "10.0.0.2",
                           *connection], capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", f"{command}: --trusted-proxy goes with --reproxy perlbal or nginx (serve mode trusts no proxy)\n")


@pytest.mark.parametrize("problem", ["domain", "tracker", "port", "host"])
def test_what_stops_it_starting_is_one_line_and_exit_1(stored: DevMogileFS, tmp_path: Path, problem: str) -> None:
    with unused_address() as nobody, socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv, expected = {
            # Any free port: the default 8000 may be another program's (then "cannot listen" came first).
            "domain": ([*connection(stored, "nosuch"), "--bind", "127.0.0.1:0"],
                       "mogile-middleware: unreg_domain: no domain 'nosuch' on the trackers\n"),
            "tracker": (["--trackers", nobody, "--domain", DOMAIN, "--bind", "127.0.0.1:0"],
                        f"mogile-middleware: no tracker answered: {nobody}: "),
            "port": ([*connection(stored), "--bind", f"127.0.0.1:{port}"],
                     f"serve: cannot listen on 127.0.0.1:{port}: Address already in use\n"),
            # The resolver's own words (no such name, or no name server at all), not "Unknown error -2".
            "host": ([*connection(stored), "--bind", "nohost.invalid:0"], "serve: cannot listen on nohost.invalid:0: "),
        }[problem]
        # The connection options before the command, as the other commands take them too.
        done = subprocess.run([*COMMAND, *argv[:4], "serve", *argv[4:]], capture_output=True, text=True,
                              env=subprocess_env(), cwd=tmp_path, timeout=START_SECONDS)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr.startswith(expected) and done.stderr.count("\n") == 1, done.stderr
    assert "Unknown error" not in done.stderr


def test_no_temporary_directory_for_the_workers_is_one_line_and_exit_1(stored: DevMogileFS, tmp_path: Path) -> None:
    """gunicorn's workers keep a file there (as under a read-only root with TMPDIR missing): the
    master announced the site's address, then stopped with a traceback and exit status 255."""
    # No temporary directory cannot be made for root, who may write anywhere: tempfile says so as it would.
    script = ("import errno, sys, tempfile\n"
              "def none():\n"
              "    raise FileNotFoundError(errno.ENOENT, \"No usable temporary directory found in ['/gone']\")\n"
              "tempfile.gettempdir = none\n"
              "from mogile_middleware.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, *connection(stored), "serve", "--bind", "127.0.0.1:0"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=START_SECONDS)
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", "serve: [Errno 2] No usable temporary directory found in ['/gone']\n")


@pytest.mark.parametrize(("prefix", "refused"), [
    ("/a?b/", "prefix must be a URL path such as '/mogilefs/', not '/a?b/'"),
    ("/a//b/", "prefix must be a URL path such as '/mogilefs/', not '/a//b/'"),
    ("/a/../", "prefix must be a URL path such as '/mogilefs/', not '/a/../': clients remove its '.' and '..' "
               "segments from a link"),
    ("mogilefs/", "not /NAME/: 'mogilefs/'"), ("/", "not /NAME/: '/'")])
def test_a_prefix_the_middleware_refuses_is_a_usage_error(capsys: pytest.CaptureFixture[str], prefix: str,
                                                          refused: str) -> None:
    # It was refused by each worker as it booted: a traceback, gunicorn's "Worker failed to boot", exit 3.
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--trackers", "127.0.0.1:1", "--domain", DOMAIN, "--prefix", prefix])  # taken: no tracker
    assert stopped.value.code == 2
    assert f"--prefix: {refused}\n" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-1", "x", "²", "١"])  # "²" failed in int(), "١" was taken for 1
def test_a_count_that_is_no_whole_number_in_ascii_digits_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], count: str) -> None:
    for option in ("--index-keys", "--workers"):
        with pytest.raises(SystemExit) as stopped:
            main(["serve", "--trackers", "127.0.0.1:1", "--domain", DOMAIN, option, count])
        assert stopped.value.code == 2
        assert f"{option}: not a positive number: {count!r}\n" in capsys.readouterr().err


@pytest.mark.parametrize("bind", ["[::1", "::1:8000", "[127.0.0.1]:8000", ":8000", "host:８０００"])
def test_a_bind_address_that_is_no_host_and_port_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                                  bind: str) -> None:
    # "[::1" was taken for the host "[:" and port 1, and failed as a name the resolver did not know.
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--trackers", "127.0.0.1:7001", "--domain", DOMAIN, "--bind", bind])
    assert stopped.value.code == 2
    assert f"--bind: not HOST:PORT: {bind!r}" in capsys.readouterr().err


def test_without_gunicorn_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "gunicorn.app.base", None)  # makes the import fail as if not installed
    assert main(["serve", "--trackers", "127.0.0.1:7001", "--domain", DOMAIN]) == 1
    assert capsys.readouterr().err == "serve: gunicorn is missing: pip install 'mogile_middleware[gunicorn]'\n"
