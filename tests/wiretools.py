"""Test helpers: a scripted tracker, a connection-counting TCP relay, generated file content."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from collections.abc import Callable

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
