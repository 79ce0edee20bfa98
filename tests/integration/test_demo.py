"""``mogile-middleware demo`` end to end: the page, every file over HTTP, a range, a clean stop."""

from __future__ import annotations

import html
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import require_module
from integration._wire_client import free_port, http_request

from mogile_middleware.cli import main
from mogile_middleware.cli.demo import sample_files

require_module("gunicorn")

REPO = Path(__file__).resolve().parents[2]
CONTENT_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".txt": "text/plain; charset=utf-8"}
LISTED = re.compile(r'<li><a href="([^"]+)">([^<]+)</a> (\d+) bytes, class (\w+)</li>')


@contextmanager
def running_demo(tmp_path: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    """The demo command on ``port`` with one worker, from this checkout, its temporary files under ``tmp_path``;
    whatever is left of its process group is killed afterwards."""
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    command = [sys.executable, "-m", "mogile_middleware", "demo", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=tmp_path, text=True, start_new_session=True
        )
    try:
        yield process
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def stdout_lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    """The process's output lines as they come (read by a thread, so the pipe never fills)."""
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    return lines


def read_until(lines: queue.Queue[str], prefix: str, timeout: float) -> list[str]:
    """The lines up to and including the first one starting with ``prefix``."""
    deadline, seen = time.monotonic() + timeout, []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            seen.append(lines.get(timeout=remaining).rstrip("\n"))
        except queue.Empty:
            break
        if seen[-1].startswith(prefix):
            return seen
    raise AssertionError(f"no {prefix!r} line within {timeout} s; got {seen}")


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def png_dimensions(data: bytes) -> tuple[int, int]:
    """Width and height of an 8-bit RGB PNG, after checking every chunk's CRC and the pixel data's size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        assert struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind], offset = body, offset + 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    return width, height


def test_the_demo_serves_its_files_then_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    with running_demo(tmp_path, port) as process:
        output = read_until(stdout_lines(process), "page ", timeout=30)
        base = f"http://127.0.0.1:{port}"
        assert output[0].startswith("tracker 127.0.0.1:") and output[-1] == f"page {base}/", output
        samples = sample_files()
        assert sorted(output[1:-1]) == sorted(f"file {base}/mogilefs/{quote(key)}" for key in samples)

        index = http_request(f"{base}/")
        assert index.status == 200 and index.headers["content-type"].startswith("text/html")
        listed = LISTED.findall(index.body.decode())
        assert sorted(html.unescape(name) for _, name, _, _ in listed) == sorted(samples)
        for href, name, size, cls in listed:
            expected_cls, content = samples[html.unescape(name)]
            reply = http_request(base + html.unescape(href))
            assert reply.status == 200, (name, reply.status)
            assert int(reply.headers["content-length"]) == int(size) == len(content) == len(reply.body), name
            assert reply.body == content and cls == expected_cls, name
            assert reply.headers["content-type"] == CONTENT_TYPES[Path(name).suffix], name
        assert png_dimensions(samples["images/gradient.png"][1]) == (256, 256)

        video = samples["videos/sample.mp4"][1]
        ranged = http_request(f"{base}/mogilefs/videos/sample.mp4", headers={"Range": "bytes=1000000-2999999"})
        assert ranged.status == 206 and int(ranged.headers["content-length"]) == 2_000_000
        assert ranged.headers["content-range"] == f"bytes 1000000-2999999/{len(video)}"
        assert ranged.body == video[1_000_000:3_000_000]
        assert http_request(f"{base}/nothing/here").status == 404

        workers = child_pids(process.pid)
        assert len(workers) == 1, workers
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a gunicorn worker outlived the demo"
        assert not list((tmp_path / "tmp").iterdir()), "the temporary MogileFS data was left behind"


def test_a_taken_port_is_one_line_of_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken, running_demo(tmp_path, taken.getsockname()[1]) as process:
        stdout, _ = process.communicate(timeout=15)
    assert process.returncode == 1 and stdout == ""
    error = (tmp_path / "stderr.txt").read_text()
    assert error.count("\n") == 1 and error.startswith("demo: cannot listen on 127.0.0.1:"), error


def test_without_gunicorn_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "gunicorn.app.base", None)  # makes the import fail as if not installed
    assert main(["demo"]) == 1
    assert capsys.readouterr().err == "demo: gunicorn is missing: pip install 'mogile_middleware[gunicorn]'\n"


def test_sigterm_before_gunicorn_serves_exits_143_and_stops_the_cluster(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    # The demo's own handler made SIGTERM a plain Ctrl-C until gunicorn started: exit 130.
    from mogile_middleware.cli import demo

    stopped: list[bool] = []

    def terminated(*args: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    original_stop = demo.DevMogileFS.stop
    monkeypatch.setattr(demo, "serve_until_stopped", terminated)
    monkeypatch.setattr(demo.DevMogileFS, "stop", lambda self: (stopped.append(True), original_stop(self))[1])
    assert main(["demo", "--bind", f"127.0.0.1:{free_port()}", "--data", str(tmp_path / "data")]) == 128 + signal.SIGTERM
    assert stopped == [True]
