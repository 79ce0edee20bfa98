"""Reads without waiting, as a kept-open connection is checked before it is used again."""

from __future__ import annotations

import select
import socket

import pytest

from mogile_middleware.deadline import readable_now


@pytest.mark.parametrize("poll", ["poll", "eventlet"])
def test_a_socket_is_readable_once_its_peer_sent_or_closed(monkeypatch: pytest.MonkeyPatch, poll: str) -> None:
    """eventlet's monkey-patching removes ``select.poll``: every file's request under its gunicorn
    worker was a 500, the second command on a kept-open tracker connection failing."""
    if poll == "eventlet":
        monkeypatch.delattr(select, "poll")
    left, right = socket.socketpair()
    with left, right:
        assert not readable_now(left)
        right.sendall(b"x")
        assert readable_now(left)
        left.recv(1)
        assert not readable_now(left)
        right.close()
        assert readable_now(left)
