"""Test helpers: a scripted tracker and storage node, a connection-counting TCP relay, generated file content."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from mogile_middleware.protocol import format_err, format_ok, parse_request

#: What a scripted tracker does with one request line: reply bytes, or None to hang up. A reply
#: without a line end is sent and then the connection is closed; b"" says nothing and waits.
Script = Callable[[bytes], "bytes | None"]


class LoopbackServer:
    """A listening socket on 127.0.0.1 with one thread per accepted connection."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = self._listener.getsockname()[:2]
        self.port = self.address[1]
        self.connections = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def drop_connections(self) -> None:
        """Close every accepted connection (the server keeps listening)."""
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def stop(self) -> None:
        """Stop listening and close every connection."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._listener.close()
        self.drop_connections()


class SilentServer(LoopbackServer):
    """Accepts connections and never answers, as a stopped (SIGSTOP) server does."""

    def _serve(self, conn: socket.socket) -> None:
        pass  # held open until stop()


class ScriptedTracker(LoopbackServer):
    """A fake tracker answering each request line with ``script(line)``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:
            pass  # the client went away
        finally:
            conn.close()

    def _answer(self, conn: socket.socket) -> None:
        with conn.makefile("rb") as reader:
            for line in reader:
                self.requests.append(line)
                reply = self.script(line)
                if reply is None:
                    return
                conn.sendall(reply)
                if reply and not reply.endswith(b"\n"):
                    return


class KeptAliveNode(LoopbackServer):
    """A storage node answering each request head (without its blank line) of a kept-open
    connection with the bytes ``answer(head)`` gives (a tuple of them: sent 50 ms apart);
    ``requests`` keeps the heads. With ``closes``, it closes the connection after its first
    answer, so a body of no known length ends."""

    def __init__(self, answer: Callable[[bytes], bytes | tuple[bytes, ...]], *, closes: bool = False) -> None:
        self.answer = answer
        self.closes = closes
        self.requests: list[bytes] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    data += piece
                head, _, data = data.partition(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.answer(head)
                for n, part in enumerate(answer if isinstance(answer, tuple) else (answer,)):
                    if n:
                        time.sleep(0.05)
                    conn.sendall(part)
                if self.closes:
                    return
        except OSError:
            pass  # the client went away
        finally:
            conn.close()

    def url(self, fid: int) -> str:
        return f"http://127.0.0.1:{self.port}/dev1/0/000/000/{fid:010d}.fid"


def files_tracker(files: dict[str, tuple[int, int, list[str]]]) -> ScriptedTracker:
    """A tracker that knows ``files``: key → its fid, its length and the URLs of its replicas."""
    def script(line: bytes) -> bytes:
        command, _, args = line.rstrip(b"\r\n").partition(b" ")
        if command == b"get_domains":
            return (b"OK domains=1&domain1=testdom&domain1classes=1&domain1class1name=thumb"
                    b"&domain1class1mindevcount=1\r\n")
        if command not in (b"get_paths", b"file_info"):
            return b"OK \r\n"
        key = parse_qs(args.strip().decode())["key"][0]
        fid, length, urls = files[key]
        if command == b"get_paths":
            return ("OK paths=%d&" % len(urls) + "&".join(f"path{n}={url}" for n, url in enumerate(urls, 1))
                    + "\r\n").encode()
        return f"OK fid={fid}&domain=testdom&class=thumb&key={key}&length={length}&devcount={len(urls)}\r\n".encode()
    return ScriptedTracker(script)


def collating_tracker(keys: list[str], *, weigh: Callable[[str], str] = str.lower, pad_space: bool = False,
                      most_requests: int = 50) -> ScriptedTracker:
    """A tracker listing ``keys`` as mogilefsd 2.73 on MySQL with a collation that reads each
    character as ``weigh`` gives it (the default collations ignore case, most accents too) and,
    with ``pad_space``, ignores trailing spaces in comparisons (not in ``LIKE``): ``list_keys``
    selects ``dkey LIKE 'prefix%' AND dkey > after ORDER BY dkey``, and refuses an ``after`` that
    does not match ``/^prefix/``; ``file_info`` and ``file_debug`` find a key equal to the one
    asked, the first giving it as asked, the second as stored. A client that asks more than
    ``most_requests`` times (one going round in circles) is refused."""
    asked = [0]

    def weight(key: str) -> str:
        weighed = weigh(key)
        return weighed.rstrip(" ") if pad_space else weighed

    def script(line: bytes) -> bytes:
        command, args = parse_request(line.rstrip(b"\r\n")) or ("", {})
        asked[0] += 1
        if asked[0] > most_requests:
            return format_err("too_many_requests")
        if command in ("file_info", "file_debug"):
            stored = [key for key in keys if weight(key) == weight(args["key"])]
            if not stored:
                return format_err("unknown_key")
            if command == "file_info":  # the key as asked
                return format_ok({"fid": 1, "domain": "d", "class": "default", "key": args["key"], "length": 1,
                                  "devcount": 1})
            return format_ok({"fid_fid": 1, "fid_dkey": stored[0]})
        prefix, after = args.get("prefix", ""), args.get("after", "")
        if prefix and after and not re.match(prefix, after):
            return format_err("after_mismatch")
        rows = sorted((key for key in keys if weigh(key).startswith(weigh(prefix)) and weight(key) > weight(after)),
                      key=weight)[:int(args.get("limit") or 1000)]
        if not rows:
            return format_err("none_match")
        return format_ok({"key_count": len(rows), "next_after": max(rows),
                          **{f"key_{number}": key for number, key in enumerate(rows, 1)}})
    return ScriptedTracker(script)


TEN = b"0123456789"


def honest(head: bytes) -> bytes:
    """A storage node's answer to ``head``, for a file of :data:`TEN`: its range, as Perlbal
    answers one ``bytes=a-b``, else all of it."""
    wanted = re.search(rb"\r\nRange: bytes=(\d+)-(\d+)", head)
    if wanted is None:
        return b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 10\r\n\r\n" + TEN
    first, last = int(wanted[1]), int(wanted[2])
    return (b"HTTP/1.0 206 Partial Content\r\nConnection: keep-alive\r\nContent-Range: bytes %d-%d/10\r\n"
            b"Content-Length: %d\r\n\r\n" % (first, last, last - first + 1) + TEN[first:last + 1])


class CountingRelay(LoopbackServer):
    """A TCP relay to ``target`` that counts the connections made through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            conn.close()
            return
        with self._lock:
            self._open.append(upstream)
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def ok(line: bytes) -> bytes:
    """A script that answers every request ``OK paths=1&path1=...`` (enough for get_paths)."""
    return b"OK paths=1&path1=http://127.0.0.1:1/dev1/0/000/000/0000000001.fid\r\n"


class PatternFile(io.RawIOBase):
    """``size`` deterministic bytes, produced on demand (the test never holds the whole file)."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.block = bytes(range(256)) * 256

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.remaining, len(self.block))
        buffer[:count] = self.block[:count]
        self.remaining -= count
        return count


def pattern_md5(size: int) -> str:
    digest, source = hashlib.md5(), PatternFile(size)
    while chunk := source.read(1024 * 1024):
        digest.update(chunk)
    return digest.hexdigest()
