"""``mogile-middleware check``: the report an operator reads, and the exit status a script tests."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import DOMAIN
from integration._wire_client import LineClient
from wiretools import LoopbackServer, ScriptedTracker, SilentServer

from mogile_middleware.cli import main
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.health import check


def run_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_healthy_cluster_exits_0_with_its_trackers_classes_hosts_and_devices(
        devmogile: DevMogileFS, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_check(capsys, "--trackers", devmogile.trackers[0], "--domain", DOMAIN)
    assert code == 0 and err == []
    assert f"{devmogile.trackers[0]}  OK" in out
    assert "avatar (2 copies)" in out and "thumb (1 copy)" in out
    assert out.count("  alive  writeable  ") == 2 and "GiB free" in out
    assert out.rstrip().endswith("all well")


def test_json_reports_the_same_for_scripts(devmogile: DevMogileFS, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_check(capsys, "--trackers", devmogile.trackers[0], "--domain", DOMAIN, "--json")
    report = json.loads(out)
    assert code == 0 and report["problems"] == []
    assert report["classes"] == {"avatar": 2, "default": 2, "thumb": 1}
    assert [tracker["reachable"] for tracker in report["trackers"]] == [True]
    assert report["trackers"][0]["rtt_ms"] > 0
    assert len(report["hosts"]) == 2 and {host["status"] for host in report["hosts"]} == {"alive"}
    devices = report["devices"]
    assert [device["observed"] for device in devices] == ["writeable", "writeable"]
    assert [device["answers_http"] for device in devices] == [True, True]
    assert all(0 < device["mb_free"] <= device["mb_total"] for device in devices)


def test_a_dead_tracker_and_an_unknown_domain_are_one_line_each(
        devmogile: DevMogileFS, capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"127.0.0.1:{refused_port()}"
    code, out, err = run_check(capsys, "--trackers", f"{devmogile.trackers[0]},{dead}", "--domain", "nosuch")
    assert code == 1
    assert err == [f"mogile-middleware: check: tracker {dead} does not answer: [Errno 111] Connection refused",
                   "mogile-middleware: check: domain 'nosuch' is not registered"]
    assert f"{dead}  FAILED" in out and "2 problem(s)" in out and "domain nosuch: classes unknown" in out


@pytest.mark.parametrize("fails", ["refuses", "hangs"])
def test_a_tracker_that_answers_noop_but_not_its_database_is_named(
        devmogile: DevMogileFS, capsys: pytest.CaptureFixture[str], fails: str) -> None:
    """A tracker whose database is down or hung answers noop: it was listed OK, and the report
    asked of it failed over to the other tracker silently (all well) or ended without naming it."""
    def script(line: bytes) -> bytes | None:
        if line.startswith(b"noop"):
            return b"OK \r\n"
        if fails == "hangs":
            time.sleep(1.5)
            return None
        return b"ERR dberror Database+is+unavailable\r\n"

    broken = ScriptedTracker(script)
    try:
        code, out, err = run_check(capsys, "--trackers", f"{broken.tracker},{devmogile.trackers[0]}", "--domain",
                                   DOMAIN, "--timeout", "0.5")
    finally:
        broken.stop()
    said = "dberror: Database is unavailable" if fails == "refuses" else "no reply within 0.5s"
    assert (code, err) == (1, [f"mogile-middleware: check: tracker {broken.tracker} answers noop but not "
                               f"get_domains: {said}"])
    assert f"{broken.tracker}  FAILED  get_domains: {said}" in out and f"{devmogile.trackers[0]}  OK" in out
    assert "thumb (1 copy)" in out and out.count("  alive  writeable  ") == 2  # from the tracker that answers


def test_an_ipv6_tracker_is_named_as_trackers_are_given(capsys: pytest.CaptureFixture[str]) -> None:
    # Named ::1:port (which --trackers refuses), its error repeated the pool's whole message.
    dead = f"[::1]:{refused_port()}"
    code, out, err = run_check(capsys, "--trackers", dead, "--domain", DOMAIN, "--timeout", "1", "--json")
    assert code == 1 and json.loads(out)["trackers"][0]["address"] == dead
    assert err[0].startswith(f"mogile-middleware: check: tracker {dead} does not answer: [Errno ")
    assert "no tracker answered" not in err[0]


def test_a_storage_node_at_an_ipv6_address_is_asked_there(capsys: pytest.CaptureFixture[str]) -> None:
    # http://::1:port/dev1/usage is no URL: every such node was called silent, its URL "bad".
    port = refused_port()
    tracker = _tracker_of({1: ("store1", port)}, ip="::1")
    try:
        _, _, err = run_check(capsys, "--trackers", tracker.tracker, "--domain", DOMAIN, "--timeout", "0.5")
    finally:
        tracker.stop()
    assert err[0].startswith(f"mogile-middleware: check: dev1 on store1 ([::1]:{port}) does not answer HTTP: [Errno ")


def test_no_tracker_answering_is_a_problem(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--trackers", f"127.0.0.1:{refused_port()}", "--domain", DOMAIN, "--timeout", "1"]
    code, out, err = run_check(capsys, *arguments)
    assert code == 1 and err[-1] == "mogile-middleware: check: no tracker answered"
    assert f"domain {DOMAIN}: classes unknown" in out  # not "no classes": nobody said
    assert json.loads(run_check(capsys, *arguments, "--json")[1])["classes"] is None


def test_hung_trackers_are_asked_at_once(devmogile: DevMogileFS, capsys: pytest.CaptureFixture[str]) -> None:
    # One after the other, three hung trackers cost three timeouts before the report.
    hung = [SilentServer() for _ in range(3)]
    try:
        trackers = ",".join([*(f"127.0.0.1:{server.port}" for server in hung), devmogile.trackers[0]])
        started = time.monotonic()
        code, out, err = run_check(capsys, "--trackers", trackers, "--domain", DOMAIN, "--timeout", "1")
        took = time.monotonic() - started
    finally:
        for server in hung:
            server.stop()
    assert code == 1 and err == [f"mogile-middleware: check: tracker 127.0.0.1:{server.port} does not answer: "
                                 "timed out" for server in hung]
    listed = out.split("domain ")[0].splitlines()[1:]  # in the order given
    assert [line.split()[:2] for line in listed] == [*([f"127.0.0.1:{server.port}", "FAILED"] for server in hung),
                                                     [devmogile.trackers[0], "OK"]]
    assert took < 2.5, took  # one timeout of 1 s, not three


_SILENT = "(127.0.0.1:{port}) does not answer HTTP: timed out"


class _Trickling(LoopbackServer):
    """A storage node that sends its answer a byte every 0.2 s (an overloaded one)."""

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nX-Padding: " + b"." * 40 + b"\r\n\r\n":
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)


@pytest.mark.parametrize(("status", "observed", "problem", "node"), [
    ("alive", "writeable", _SILENT, SilentServer), ("readonly", "writeable", _SILENT, SilentServer),
    ("drain", "writeable", _SILENT, SilentServer),
    ("readonly", "unreachable", "is readonly but the trackers cannot reach it", SilentServer),
    ("dead", "writeable", None, SilentServer),
    ("alive", "writeable", _SILENT, _Trickling),  # called healthy after all its bytes came, 0.5 s apart at most
])
def test_a_hung_storage_node_the_trackers_call_writeable_is_a_problem(
        capsys: pytest.CaptureFixture[str], status: str, observed: str, problem: str | None,
        node: type[LoopbackServer]) -> None:
    """mogilefsd goes on calling a stopped (SIGSTOP) mogstored writeable: check asks the node itself,
    for every device files are read from: one set aside (readonly, drain) too, not a retired one.
    A device whose node does not answer takes no copy of a class either."""
    hung, answering = node(), _NotFound()
    tracker = _tracker_of({1: ("store1", hung.port), 2: ("store2", answering.port)}, status, observed)
    try:
        code, out, err = run_check(capsys, "--trackers", tracker.tracker, "--domain", DOMAIN, "--timeout", "0.5")
        problems = [f"dev1 on store1 {problem.format(port=hung.port)}"] if problem else []
        assert code == 1 and err == [f"mogile-middleware: check: {line}" for line in [
            *problems, "class 'thumb' keeps 2 copies, but only 1 host(s) have a writeable device"]]
        # The device's line says it too: the trackers' words alone read as a healthy device.
        rows = [line for line in out.splitlines() if line.startswith("  [dev")]
        assert [row.endswith("does not answer HTTP") for row in rows] == [problem == _SILENT, False]
    finally:
        tracker.stop()
        hung.stop()
        answering.stop()


def _tracker_of(hosts: dict[int, tuple[str, int]], status: str = "alive", observed: str = "writeable",
                ip: str = "127.0.0.1") -> ScriptedTracker:
    """A tracker of one class of 2 copies, and of the ``hosts`` by number (name, HTTP port) at
    ``ip`` with a device each, the first one ``status`` and ``observed`` so."""
    replies = {
        b"noop": b"OK \r\n",
        b"get_domains": b"OK domains=1&domain1=testdom&domain1classes=1&domain1class1name=thumb"
                        b"&domain1class1mindevcount=2\r\n",
        b"get_hosts": (f"OK hosts={len(hosts)}&" + "&".join(
            f"host{n}_hostid={n}&host{n}_hostname={name}&host{n}_hostip={ip}&host{n}_http_port={port}"
            f"&host{n}_status=alive" for n, (name, port) in hosts.items()) + "\r\n").encode(),
        b"get_devices": (f"OK devices={len(hosts)}&" + "&".join(
            f"dev{n}_devid={n}&dev{n}_hostid={n}&dev{n}_status={status if n == 1 else 'alive'}"
            f"&dev{n}_observed_state={observed if n == 1 else 'writeable'}"
            f"&dev{n}_mb_total=100000&dev{n}_mb_free=90000" for n in hosts) + "\r\n").encode(),
        b"list_fids": b"OK fid_count=0\r\n",
    }
    return ScriptedTracker(lambda line: replies[line.split()[0]])


def test_what_the_trackers_say_reaches_the_terminal_escaped_once(capsys: pytest.CaptureFixture[str]) -> None:
    """A device's states were printed as the tracker sent them (a terminal's title set, a bell),
    and a domain named in a problem line was escaped twice (its repr, escaped again)."""
    tracker = _tracker_of({1: ("store1", refused_port())}, status="alive%07", observed="writeable%1B]0;owned%07")
    try:
        _, out, err = run_check(capsys, "--trackers", tracker.tracker, "--domain", "a\tb", "--timeout", "0.5")
    finally:
        tracker.stop()
    assert "\x1b" not in out and "\x07" not in out
    assert "  [dev1] store1  alive\\x07  writeable\\x1b]0;owned\\x07" in out
    assert "mogile-middleware: check: domain 'a\\tb' is not registered" in err


@pytest.mark.parametrize("reply", [b"get_hosts", b"get_devices"])
def test_a_host_or_device_list_that_cannot_be_read_is_a_problem_of_the_report(
        capsys: pytest.CaptureFixture[str], reply: bytes) -> None:
    """It ended the command with one line and no report: ``--json`` printed nothing for a script to read."""
    tracker = _tracker_of({1: ("store1", refused_port())})
    answer = tracker.script
    tracker.script = lambda line: (b"OK hosts=1&host1_hostid=1\r\n" if reply == b"get_hosts" else
                                   b"OK devices=1&dev1_devid=abc\r\n") if line.split()[0] == reply else answer(line)
    try:
        code, out, err = run_check(capsys, "--trackers", tracker.tracker, "--domain", DOMAIN, "--json")
    finally:
        tracker.stop()
    report = json.loads(out)
    assert code == 1 and report["trackers"][0]["reachable"] and report["classes"] is None
    unread = "no 'host1_hostname'" if reply == b"get_hosts" else "dev1_devid='abc', not a number"
    assert report["problems"] == [f"tracker {tracker.tracker} answers noop but not {reply.decode()}: "
                                  f"the tracker's reply has {unread}"]
    assert err[-1] == f"mogile-middleware: check: {report['problems'][0]}"


@pytest.mark.parametrize("fails", ["get_hosts", "get_devices", "list_fids"])
def test_a_tracker_failing_after_noop_is_named_though_another_tells_the_cluster(
        devmogile: DevMogileFS, capsys: pytest.CaptureFixture[str], fails: str) -> None:
    """A tracker that answered noop and get_domains was listed OK, and the report it did not give
    was asked of the next tracker silently: all well, exit 0. mogilefsd answers everything but
    list_fids from its memory, so a tracker whose database is down answers all the rest."""
    forward = _Forwarding(devmogile.trackers[0], refuse=fails)
    try:
        code, out, err = run_check(capsys, "--trackers", f"{forward.tracker},{devmogile.trackers[0]}",
                                   "--domain", DOMAIN, "--timeout", "0.5")
    finally:
        forward.stop()
    asked = "list_fids (its database)" if fails == "list_fids" else fails
    assert (code, err) == (1, [f"mogile-middleware: check: tracker {forward.tracker} answers noop but not "
                               f"{asked}: dberror: Database is unavailable"])
    assert "thumb (1 copy)" in out and out.count("  alive  writeable  ") == 2


class _Forwarding(ScriptedTracker):
    """A tracker that passes each request line on to ``tracker`` and sends back its reply, but
    answers ``refuse`` with a database error."""

    def __init__(self, tracker: str, refuse: str) -> None:
        host, _, port = tracker.rpartition(":")
        self._upstream = socket.create_connection((host, int(port)))
        self._lock = threading.Lock()
        super().__init__(lambda line: b"ERR dberror Database+is+unavailable\r\n" if line.split()[0] == refuse.encode()
                         else self._ask(line))

    def _ask(self, line: bytes) -> bytes:
        with self._lock:
            self._upstream.sendall(line + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                reply += self._upstream.recv(65536)
            return reply

    def stop(self) -> None:
        super().stop()
        self._upstream.close()


def test_a_device_of_a_host_set_readonly_is_no_problem_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """mogilefsd observes the devices of a host marked readonly as readable: each was reported as
    an alive device that cannot be written to, for what the operator chose."""
    node = _NotFound()
    tracker = _tracker_of({1: ("store1", node.port)}, observed="readable")
    replies = {b"get_hosts": tracker.script(b"get_hosts").replace(b"host1_status=alive", b"host1_status=readonly")}
    answer = tracker.script
    tracker.script = lambda line: replies.get(line.split()[0]) or answer(line)
    try:
        code, _, err = run_check(capsys, "--trackers", tracker.tracker, "--domain", DOMAIN, "--timeout", "0.5")
    finally:
        tracker.stop()
        node.stop()
    assert (code, err) == (1, ["mogile-middleware: check: class 'thumb' keeps 2 copies, but only 0 host(s) have "
                               "a writeable device"])


def test_a_host_whose_address_is_stored_in_brackets_is_named_with_one_pair(devmogile: DevMogileFS) -> None:
    """mogilefsd builds a replica's URL from the host's address as stored, so an IPv6 host is
    registered as ``[::1]``: check wrote ``[[::1]]:7500`` and found its devices dead."""
    with LineClient(devmogile.tracker_address) as tracker:
        tracker.ok("create_host", host="six", ip="[::1]", port=7500)
    assert "[::1]:7500" in [host.address for host in check(devmogile.trackers, DOMAIN).hosts]


def test_check_takes_trackers_as_client_does(devmogile: DevMogileFS) -> None:
    assert check(devmogile.trackers, DOMAIN).problems == []  # ["host:port"]: a TypeError
    assert check(",".join(devmogile.trackers), DOMAIN).trackers[0].address == devmogile.trackers[0]
    for domain in (None, b"testdom", ""):  # a report for the domain None
        with pytest.raises(ValueError, match="domain must be a domain's name"):
            check(devmogile.trackers, domain)  # type: ignore[arg-type]


def test_a_reader_of_the_report_that_leaves_early_does_not_hide_the_problems(tmp_path: Path) -> None:
    """``check | head -1`` exited 0 without a problem line: a monitor reading only the exit status
    saw all well."""
    command = [sys.executable, "-m", "mogile_middleware", "check", "--trackers", f"127.0.0.1:{refused_port()}",
               "--domain", DOMAIN, "--timeout", "1"]
    for reader in ("head -c 1", "true"):
        run = subprocess.run(f"{shlex.join(command)} 2>{tmp_path / 'err'} | {reader}; exit ${{PIPESTATUS[0]}}",
                             shell=True, executable="/bin/bash", capture_output=True, timeout=60)
        assert run.returncode == 1
        assert (tmp_path / "err").read_text().endswith("mogile-middleware: check: no tracker answered\n")


class _NotFound(LoopbackServer):
    """A storage node that answers 404 to every request (an answer all the same)."""

    head = b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(self.head)


class _Chunked(_NotFound):
    """A storage node whose answer the middleware would refuse to read a file from."""

    head = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"


def test_a_storage_node_that_answers_in_any_way_answers(capsys: pytest.CaptureFixture[str]) -> None:
    nodes = [_Chunked(), _NotFound()]
    tracker = _tracker_of({n: (f"store{n}", node.port) for n, node in enumerate(nodes, 1)})
    try:
        assert run_check(capsys, "--trackers", tracker.tracker, "--domain", DOMAIN, "--timeout", "0.5")[::2] == (0, [])
    finally:
        tracker.stop()
        for node in nodes:
            node.stop()


def test_a_stopped_storage_node_is_reported_with_what_it_leaves_short(
        devmogile: DevMogileFS, capsys: pytest.CaptureFixture[str]) -> None:
    devmogile.nodes[1].stop()
    deadline = time.monotonic() + 15
    while True:  # until the tracker's monitor has seen it
        code, out, err = run_check(capsys, "--trackers", devmogile.trackers[0], "--domain", DOMAIN)
        if "unreachable" in out or time.monotonic() > deadline:
            break
        # Before that, check asked the node itself.
        assert code == 1 and any(line.endswith("does not answer HTTP: [Errno 111] Connection refused")
                                 for line in err), err
        time.sleep(0.2)
    assert code == 1 and "unreachable" in out
    assert not any("does not answer HTTP" in line for line in err)  # the trackers' word, once
    assert any(line.endswith("is alive but the trackers cannot reach it") for line in err)
    assert "mogile-middleware: check: class 'avatar' keeps 2 copies, but only 1 host(s) have a writeable device" in err
    assert not any("'thumb'" in line for line in err)  # one copy: one node is enough
