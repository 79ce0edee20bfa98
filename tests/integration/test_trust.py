"""Trusted proxies as deployments see them, through a real gunicorn: a dual-stack bind, a unix socket."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from conftest import DOMAIN, require_module
from integration._gunicorn import run_gunicorn
from integration._wire_client import free_port, read_http_reply

from mogile_middleware import Client, MogileFSMiddleware
from mogile_middleware.devserver import DevMogileFS

require_module("gunicorn")

REQUEST = b"GET /mogilefs/photo.png HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n"


def reproxied(sock: socket.socket) -> bool:
    """True if the answer on ``sock`` sent the client to the storage nodes instead of the body."""
    with sock:
        sock.sendall(REQUEST)
        reply, _ = read_http_reply(sock, "GET")
    assert reply.status == 200
    return "x-reproxy-url" in reply.headers


@pytest.mark.parametrize(("trusted", "over_ipv6", "over_unix"), [
    pytest.param("127.0.0.1", True, False, id="ipv4-only"),
    pytest.param("127.0.0.1,unix", True, True, id="with-the-unix-socket"),
    # Written as a dual-stack bind shows the peer: it matched no peer at all.
    pytest.param("::ffff:127.0.0.1", True, False, id="written-ipv4-mapped"),
])
def test_ipv4_mapped_peers_and_the_unix_socket(devmogile: DevMogileFS, tmp_path: Path, trusted: str,
                                               over_ipv6: bool, over_unix: bool) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("photo.png", b"png bytes", cls="thumb")
    dual_stack, unix_path = free_port(), tmp_path / "app.sock"
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0], "MOGILE_REPROXY": "perlbal",
           "MOGILE_TRUSTED_PROXIES": trusted}
    with run_gunicorn(env, extra_args=["--bind", f"[::]:{dual_stack}", "--bind", f"unix:{unix_path}"]) as server:
        # 127.0.0.1 reaching a [::] socket arrives as ::ffff:127.0.0.1.
        assert reproxied(socket.create_connection(("127.0.0.1", dual_stack), timeout=10)) is over_ipv6
        assert reproxied(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        unix = socket.socket(socket.AF_UNIX)
        unix.connect(str(unix_path))
        assert reproxied(unix) is over_unix


@pytest.mark.parametrize(("options", "warned"), [
    pytest.param({"reproxy": "perlbal"}, "without trusted_proxies", id="reproxy"),
    pytest.param({"reproxy": "nginx", "require_proxy_header": True}, "whatever proxy header", id="proxy-header"),
    pytest.param({"reproxy": "nginx", "trusted_proxies": ["10.0.0.1"]}, None, id="trusted"),
    pytest.param({"reproxy": "perlbal", "trusted_proxies": []}, "none reproxied", id="no-trusted-proxy"),
    pytest.param({}, None, id="serve"),
])
def test_spoofable_or_idle_reproxy_is_warned_about_at_start(caplog: pytest.LogCaptureFixture, options: dict,
                                                    warned: str | None) -> None:
    with caplog.at_level(logging.WARNING, logger="mogile_middleware"):
        MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers="127.0.0.1:1", **options)
    messages = [record.getMessage() for record in caplog.records]
    assert any(warned in message for message in messages) if warned else not messages


@pytest.mark.parametrize("proxies", [["10.0.0.300"], ["unix:/tmp/x"], "10.0.0.1", b"10.0.0.1", bytearray(b"10.0.0.1")])
def test_a_bad_trusted_proxy_is_refused_naming_it(proxies: object) -> None:
    with pytest.raises(ValueError, match="10.0.0|unix"):
        MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers="127.0.0.1:1",
                           trusted_proxies=proxies)
