"""The development MogileFS under admin commands: usage files, the monitor's figures, states, settings, bad input.

What the captured transcript (test_conformance_admin.py) cannot show: figures that match the disk,
what device and host states do to reads and writes, settings the tracker acts on, old data
directories, and that no argument makes the tracker fail or drop the connection.
"""

from __future__ import annotations

import http.server
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import CLASSES, DOMAIN
from integration._wire_client import LineClient, eventually, http_request, paths_of, upload

from mogile_middleware.devserver import DevMogileFS, MetadataStore, diskusage
from mogile_middleware.devserver.settings import cleaner_for


@pytest.fixture
def client(devmogile: DevMogileFS) -> Iterator[LineClient]:
    """A raw connection to the fixture's tracker."""
    with LineClient(devmogile.tracker_address) as line_client:
        yield line_client


# -- the usage file ---------------------------------------------------------------------------


def test_usage_figures_are_df_figures_of_the_directory(tmp_path: Path) -> None:
    fields = diskusage.measure(tmp_path)
    stat = os.statvfs(tmp_path)
    assert list(fields) == ["available", "device", "disk", "time", "total", "use", "used"]
    assert fields["total"] == fields["used"] + fields["available"]  # type: ignore[operator]
    assert fields["available"] == stat.f_bavail * stat.f_frsize // 1024
    assert fields["disk"] == str(tmp_path) and fields["device"]
    assert str(fields["use"]).endswith("%") and abs(int(fields["time"]) - time.time()) < 5


def test_usage_file_format_and_what_the_tracker_reads_of_it() -> None:
    fields: dict[str, str | int] = {"used": 3, "total": 10, "available": 7, "use": "30%", "device": "/dev/x"}
    data = diskusage.format_usage(fields)
    assert data == b"available: 7\ndevice: /dev/x\ntotal: 10\nuse: 30%\nused: 3\n"
    assert diskusage.parse_usage(data) == (3, 10)
    assert diskusage.parse_usage(b"used: 0\ntotal: 10\n") is None  # as mogilefsd: no figures
    assert diskusage.parse_usage(b"<h1>404 - Not Found</h1>\n") is None
    assert diskusage.parse_usage(b"total : 10\r\nused:4\r\n") == (4, 10)


def test_usage_file_is_rewritten_only_when_older_than_ten_seconds(tmp_path: Path) -> None:
    usage = tmp_path / diskusage.USAGE_FILE
    diskusage.refresh(tmp_path)
    first = usage.read_bytes()
    usage.write_bytes(b"stale\n")
    diskusage.refresh(tmp_path)
    assert usage.read_bytes() == b"stale\n"
    old = time.time() - diskusage.REFRESH_SECONDS - 1
    os.utime(usage, (old, old))
    diskusage.refresh(tmp_path)
    assert usage.read_bytes().split(b"\n")[1:3] == first.split(b"\n")[1:3]  # device and disk
    assert diskusage.parse_usage(usage.read_bytes()) is not None
    assert [path.name for path in tmp_path.iterdir()] == [diskusage.USAGE_FILE]


def test_a_usage_file_the_full_disk_cannot_take_is_answered_with_the_figures_of_now(
        devmogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """It served the figures of before the disk filled (``check``: "3 MB free" on a full device),
    logging a traceback at each of the tracker's two requests a second."""
    node = devmogile.nodes[0]
    usage = node.docroot / "dev1" / diskusage.USAGE_FILE
    http_request(f"{node.url}/dev1/usage")
    usage.write_bytes(b"available: 999999\ntotal: 1000000\nused: 1\n")  # what the disk held before
    old = time.time() - diskusage.REFRESH_SECONDS - 1
    os.utime(usage, (old, old))

    def full(directory: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskusage, "refresh", full)
    for _ in range(3):
        reply = http_request(f"{node.url}/dev1/usage")
        assert reply.status == 200 and b"disk: " + str(node.docroot / "dev1").encode() in reply.body
        assert diskusage.parse_usage(reply.body) != (1, 1000000)
    assert [record.getMessage() for record in caplog.records if "usage" in record.getMessage()] == [
        f"cannot write {str(usage)!r}: [Errno 28] No space left on device"]


def test_storage_node_serves_usage_of_device_directories_only(devmogile: DevMogileFS) -> None:
    node = devmogile.nodes[0]
    reply = http_request(f"{node.url}/dev1/usage")
    assert (reply.status, reply.headers["content-type"]) == (200, "text/plain")
    assert diskusage.parse_usage(reply.body) is not None
    assert f"disk: {node.docroot / 'dev1'}\n".encode() in reply.body
    assert http_request(f"{node.url}/dev7/usage").status == 404
    assert not (node.docroot / "dev7").exists()
    assert http_request(f"{node.url}/dev1/0/usage").status == 404


# -- what the monitor observes ----------------------------------------------------------------


def test_get_devices_reports_the_figures_of_the_usage_file(devmogile: DevMogileFS, client: LineClient) -> None:
    devices = client.ok("get_devices")
    for number in (1, 2):
        usage = http_request(f"{devmogile.nodes[number - 1].url}/dev{number}/usage").body
        used, total = diskusage.parse_usage(usage) or (0, 0)
        assert int(devices[f"dev{number}_mb_total"]) == total // 1024
        assert abs(int(devices[f"dev{number}_mb_used"]) - used // 1024) < 64  # other writers, meanwhile
        mb_free = int(devices[f"dev{number}_mb_total"]) - int(devices[f"dev{number}_mb_used"])
        assert int(devices[f"dev{number}_mb_free"]) == mb_free
        assert (devices[f"dev{number}_mb_asof"], devices[f"dev{number}_reject_bad_md5"]) == ("", "1")


def test_a_stopped_node_keeps_its_last_figures(devmogile: DevMogileFS, client: LineClient) -> None:
    before = client.ok("get_devices", devid=2)
    devmogile.nodes[1].stop()
    try:
        down = eventually(
            lambda: client.ok("get_devices", devid=2), lambda seen: seen["dev1_observed_state"] == "unreachable"
        )
        assert down["dev1_observed_state"] == "unreachable"
        assert down["dev1_mb_total"] == before["dev1_mb_total"]
    finally:
        devmogile.nodes[1].start()
    client.ok("clear_cache")
    assert client.ok("get_devices", devid=2)["dev1_observed_state"] == "writeable"


def test_a_device_without_directory_is_unreachable_until_it_exists(devmogile: DevMogileFS, client: LineClient) -> None:
    client.ok("create_device", devid=3, hostname="stor1")
    assert client.ok("get_devices", devid=3)["dev1_observed_state"] == "unreachable"
    (devmogile.nodes[0].docroot / "dev3").mkdir()
    client.ok("clear_cache")
    device = client.ok("get_devices", devid=3)
    assert device["dev1_observed_state"] == "writeable" and device["dev1_mb_total"]


def test_a_plain_web_server_docroot_is_a_device_without_figures(devmogile: DevMogileFS, tmp_path: Path) -> None:
    docroot = tmp_path / "plain"
    (docroot / "dev3").mkdir(parents=True)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(docroot))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        devid = devmogile.add_storage_node("127.0.0.1", server.server_address[1])
        with LineClient(devmogile.tracker_address) as client:
            device = client.ok("get_devices", devid=devid)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert (device["dev1_observed_state"], device["dev1_mb_total"]) == ("writeable", "")


# -- what states do ---------------------------------------------------------------------------


def test_device_states_decide_where_files_go_and_come_from(devmogile: DevMogileFS, client: LineClient) -> None:
    assert upload(client, DOMAIN, "both", b"data", "avatar") == b"OK \r\n"
    client.ok("set_state", host="stor2", device=2, state="readonly")
    assert client.ok("get_devices", devid=2)["dev1_observed_state"] == "readable"
    for number in range(4):  # new files only go to dev1 now
        opened = client.ok("create_open", domain=DOMAIN, key=f"new{number}")
        assert opened["devid"] == "1"
    assert len(paths_of(client.call("get_paths", domain=DOMAIN, key="both", noverify=1))) == 2
    client.ok("set_state", host="stor2", device=2, state="drain")
    for _ in range(4):  # a draining device's path comes last
        assert paths_of(client.call("get_paths", domain=DOMAIN, key="both", noverify=1))[1].endswith(
            "/dev2/0/000/000/0000000001.fid"
        )
    client.ok("set_state", host="stor2", device=2, state="dead")
    dead_excluded = paths_of(client.call("get_paths", domain=DOMAIN, key="both", noverify=1))
    assert [url.split("/")[3] for url in dead_excluded] == ["dev1"]
    assert client.ok("file_info", domain=DOMAIN, key="both", devices=1)["devids"] == "1"  # the copy is lost
    assert client.call("set_state", host="stor2", device=2, state="alive").startswith(b"ERR state_too_high ")


def test_a_host_marked_down_is_not_used(client: LineClient) -> None:
    client.ok("update_host", host="stor1", status="down")
    devices = client.ok("get_devices", devid=1)
    assert devices["dev1_observed_state"] == "writeable"  # not looked at any more: the last observation
    for number in range(4):
        assert client.ok("create_open", domain=DOMAIN, key=f"k{number}")["devid"] == "2"
    client.ok("update_host", host="stor2", status="down")
    assert client.call("create_open", domain=DOMAIN, key="k").startswith(b"ERR no_devices ")


@pytest.mark.parametrize(("command", "which", "field"), [
    ("set_state", {"host": "stor2", "device": 2}, "state"),
    ("update_host", {"host": "stor2"}, "status"),
], ids=["device", "host"])
def test_copies_missed_while_marked_down_are_made_once_marked_alive(
        client: LineClient, command: str, which: dict[str, Any], field: str) -> None:
    """As mogilefsd retries a copy that found no device: a two-copy file stored while the other
    device (or its host) was down gets its second copy once it is alive again."""
    client.ok(command, **which, **{field: "down"})
    assert upload(client, DOMAIN, "while-down", b"data", "avatar") == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="while-down")["devcount"] == "1"
    client.ok(command, **which, **{field: "alive"})
    devcount = eventually(lambda: client.ok("file_info", domain=DOMAIN, key="while-down")["devcount"],
                          lambda count: count == "2")
    assert devcount == "2"


def test_a_second_copy_goes_to_another_device_of_the_host_when_no_other_host_takes_it(
        devmogile: DevMogileFS, client: LineClient) -> None:
    """As mogilefsd's ``MultipleHosts()``: with no other host to take a copy, another device of a
    host holding one does. A two-copy file on a one-host MogileFS kept one copy for good."""
    client.ok("create_device", devid=3, hostname="stor1")
    (devmogile.nodes[0].docroot / "dev3").mkdir()
    client.ok("update_host", host="stor2", status="down")
    client.ok("clear_cache")
    assert upload(client, DOMAIN, "one-host", b"data", "avatar") == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="one-host", devices=1)["devids"] in ("1,3", "3,1")
    assert upload(client, DOMAIN, "one-copy", b"data", "thumb") == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="one-copy")["devcount"] == "1"


def test_a_device_a_copy_failed_to_is_not_tried_again_in_the_same_pass(client: LineClient,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """As mogilefsd's ``$failed``: a node that hangs costs one copy timeout, not one per pass over the devices."""
    from mogile_middleware.devserver import replication

    tried: list[int] = []

    def failing_copy(ctx: Any, fid: int, length: int, source: Any, target: Any, hashed: bool) -> bool:
        tried.append(target.devid)
        return False

    monkeypatch.setattr(replication, "_copy", failing_copy)
    assert upload(client, DOMAIN, "one-copy-made", b"data", "avatar") == b"OK \r\n"
    assert len(tried) == 1 and client.ok("file_info", domain=DOMAIN, key="one-copy-made")["devcount"] == "1"


def test_hosts_and_devices_survive_a_restart(tmp_path: Path) -> None:
    with DevMogileFS(data_dir=tmp_path, domains={DOMAIN: CLASSES}) as mogile, LineClient(mogile.tracker_address) as c:
        c.ok("create_host", host="extra", ip="127.0.0.1", port=7600, getport=7601, altmask="10.0.0.0/8")
        c.ok("create_device", devid=9, hostname="extra", state="down")
        c.ok("set_weight", host="stor1", device=1, weight=40)
        hosts, devices = c.ok("get_hosts"), c.ok("get_devices")
        ports = [node.port for node in mogile.nodes]
    with DevMogileFS(data_dir=tmp_path, storage_ports=ports) as mogile, LineClient(mogile.tracker_address) as c:
        assert c.ok("get_hosts") == hosts
        again = c.ok("get_devices")
        assert {name: value for name, value in again.items() if "_mb_" not in name} == {
            name: value for name, value in devices.items() if "_mb_" not in name
        }


def test_an_old_data_directory_gets_the_new_host_columns(tmp_path: Path) -> None:
    path = tmp_path / "mogilefs.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE host (hostid INTEGER PRIMARY KEY, hostname TEXT NOT NULL UNIQUE, hostip TEXT NOT NULL,"
            " http_port INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'alive');"
            "INSERT INTO host (hostname, hostip, http_port) VALUES ('stor1', '127.0.0.1', 7500);"
            "CREATE TABLE server_settings (field TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO server_settings VALUES ('schema_version', '1');"
        )
    db.close()
    store = MetadataStore(path)
    try:
        (host,) = store.hosts()
        assert (host.hostname, host.http_port, host.http_get_port, host.altip) == ("stor1", 7500, None, None)
        assert store.server_settings() == [("schema_version", "17")]
    finally:
        store.close()


# -- settings the tracker acts on, delayed copies ---------------------------------------------


def test_case_sensitive_list_keys(client: LineClient) -> None:
    for key in ("Abc", "abd"):
        assert upload(client, DOMAIN, key, b"x", "thumb") == b"OK \r\n"
    assert client.ok("list_keys", domain=DOMAIN, prefix="a")["key_count"] == "2"
    client.ok("set_server_setting", key="case_sensitive_list_keys", value="on")
    assert client.ok("list_keys", domain=DOMAIN, prefix="a")["key_1"] == "abd"
    assert client.ok("list_keys", domain=DOMAIN, prefix="a")["key_count"] == "1"


def test_replicate_now_makes_the_delayed_copies(tmp_path: Path) -> None:
    with (
        DevMogileFS(data_dir=tmp_path, domains={DOMAIN: CLASSES}, replication_delay=60) as mogile,
        LineClient(mogile.tracker_address) as client,
    ):
        assert upload(client, DOMAIN, "later", b"data", "avatar") == b"OK \r\n"
        assert client.ok("file_info", domain=DOMAIN, key="later")["devcount"] == "1"
        assert client.ok("replicate_now") == {"count": "1"}
        assert client.ok("file_info", domain=DOMAIN, key="later")["devcount"] == "2"


# -- bad input --------------------------------------------------------------------------------


def test_a_host_with_a_port_that_is_no_port_is_unreachable(devmogile: DevMogileFS, client: LineClient) -> None:
    assert upload(client, DOMAIN, "kept", b"data", "avatar") == b"OK \r\n"
    client.ok("update_host", host="stor2", port="abc")
    assert client.ok("get_devices", devid=2)["dev1_observed_state"] == "unreachable"
    assert [url.split("/")[3] for url in paths_of(client.call("get_paths", domain=DOMAIN, key="kept"))] == ["dev1"]
    client.ok("update_host", host="stor2", port=devmogile.nodes[1].port)
    assert client.ok("get_devices", devid=2)["dev1_observed_state"] == "writeable"

ODD_VALUES = ["", "0", "-1", "abc", "1e3", "99999999999999999999", "%00", "stor1", "dead", "/", "a" * 300]
ADMIN_COMMANDS = [
    "create_host", "update_host", "delete_host", "create_device", "set_state", "set_weight",
    "delete_domain", "delete_class", "set_server_setting", "server_setting", "get_hosts", "get_devices",
]
ARGUMENTS = ["host", "hostname", "hostid", "devid", "device", "state", "status", "weight", "ip", "port",
             "domain", "class", "key", "value"]


@pytest.mark.parametrize("command", ADMIN_COMMANDS)
def test_odd_arguments_get_ok_or_err_and_the_connection_stays(command: str, client: LineClient) -> None:
    for value in ODD_VALUES:
        for names in (ARGUMENTS[:5], ARGUMENTS[5:10], ARGUMENTS[10:], ARGUMENTS):
            reply = client.call(command, **dict.fromkeys(names, value))
            assert reply.startswith((b"OK ", b"ERR ")) and reply.endswith(b"\r\n"), (command, value, reply)
            assert not reply.startswith(b"ERR failure "), (command, names, value, reply)
    assert client.call("noop") == b"OK \r\n"


@pytest.mark.parametrize(
    ("key", "value", "stored"),
    [
        pytest.param("skip_mkcol", "Yes", "1", id="bool-yes"),
        pytest.param("skip_mkcol", "off", "0", id="bool-off"),
        pytest.param("skip_mkcol", None, "0", id="bool-missing"),
        pytest.param("memcache_ttl", "", "0", id="number-blank"),
        pytest.param("slave_x", "0", None, id="slave-zero-removes"),
        pytest.param("zone_a", "10.1.0.0/16 default", "10.1.0.0/16 default", id="netmasks"),
        pytest.param("fsck_checksum", "SHA-1", "SHA-1", id="checksum"),
        pytest.param("queue_x", None, None, id="queue-missing-removes"),
    ],
)
def test_setting_values_are_normalised_as_mogilefsd_does(key: str, value: str | None, stored: str | None) -> None:
    clean = cleaner_for(key)
    assert clean is not None and clean(value) == stored


def test_mogadm_asks_of_fsck_and_rebalance_as_of_a_mogilefsd_that_never_ran_them(client: LineClient) -> None:
    """mogilefsd 2.73's answers before any fsck or rebalance: ``mogadm fsck status`` said "can't get
    fsck status" (exit 1), and ``MogileFS::Client->sleep`` failed, on an unknown command."""
    status = client.ask("fsck_status")
    assert status.startswith(b"OK ") and b"running=0" in status and b"max_fid_checked=0" in status
    assert client.ask("fsck_getlog") == b"OK row_count=0\r\n"
    assert client.ask("fsck_clearlog") == b"OK \r\n"
    assert client.ask("rebalance_status") == b"ERR no_rebal_state No+available+rebalance+status\r\n"
    assert client.ask("rebalance_test") == b"ERR no_rebal_policy No+rebalance+policy+available\r\n"
    started = time.monotonic()
    assert client.ask("sleep duration=1") == b"OK \r\n" and time.monotonic() - started >= 1
