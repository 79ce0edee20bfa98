"""The development tracker over raw sockets: framing, errors, bad input, uploads, replication, failures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLASSES, DOMAIN
from integration._wire_client import LineClient, eventually, free_port, http_request, paths_of, upload

from mogile_middleware.cli import build_parser
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.protocol import decode_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(devmogile: DevMogileFS) -> Iterator[LineClient]:
    """A raw connection to the fixture's tracker."""
    with LineClient(devmogile.tracker_address) as line_client:
        yield line_client


def args_of(reply: bytes) -> dict[str, str]:
    assert reply.startswith(b"OK "), reply
    return decode_args(reply[3:].rstrip(b"\r\n"))


# -- framing ----------------------------------------------------------------------------------


def test_pipelined_lines_get_one_reply_each_in_order(client: LineClient) -> None:
    client.send(b"noop\r\nnoop callid=7\r\nfrobnicate\nget_domains domain=x\r\n")
    first, second, third, fourth = client.read_lines(4)
    assert (first, second, third) == (b"OK \r\n", b"OK callid=7\r\n", b"ERR unknown_command Unknown+server+command\r\n")
    assert fourth.startswith(b"OK ") and b"domain1=testdom" in fourth


def test_empty_lines_get_no_reply(client: LineClient) -> None:
    client.send(b"\r\n\n\r\n")
    assert client.silent_for(0.3)
    client.send(b"\r\n\r\nnoop\r\n")
    assert client.read_line() == b"OK \r\n"
    assert client.silent_for(0.1)


def test_nothing_is_answered_before_the_line_end(client: LineClient) -> None:
    client.send(b"no")
    assert client.silent_for(0.2)
    client.send(b"op")
    assert client.silent_for(0.2)
    client.send(b"\r\n")
    assert client.read_line() == b"OK \r\n"


def test_leading_blanks_case_and_nul_are_tolerated(client: LineClient) -> None:
    client.send(b"   noop\r\n\tNOOP   \r\nnoop\x00\r\n")
    assert client.read_lines(3) == [b"OK \r\n"] * 3


def test_a_bare_cr_stays_in_the_key(client: LineClient) -> None:
    assert upload(client, DOMAIN, "cr", b"x", "thumb") == b"OK \r\n"
    assert client.ask(b"get_paths domain=testdom&key=cr\rnoop") == b"ERR unknown_key unknown_key\r\n"
    assert client.ask(b"get_paths domain=testdom&key=cr\r\r") == b"ERR unknown_key unknown_key\r\n"
    opened = args_of(client.ask(b"create_open domain=testdom&key=cr\rx&class=thumb"))
    assert opened["fid"]
    assert client.ask(b"file_debug fid=" + opened["fid"].encode()).count(b"tempfile_dkey=cr%0Dx") == 1


# -- errors -----------------------------------------------------------------------------------

ERRORS = [
    (b"frobnicate domain=testdom", b"ERR unknown_command Unknown+server+command"),
    (b"get-paths domain=testdom&key=x", b"ERR unknown_command Unknown+server+command"),
    (b"\x16\x03\x01\x00\x05hello", b"ERR unknown_command Unknown+server+command"),
    (b"GET / HTTP/1.0", b"ERR unknown_command Unknown+server+command"),
    (b"get_paths key=x", b"ERR no_domain No+domain+provided"),
    (b"get_paths domain=&key=x&callid=c1", b"ERR no_domain No+domain+provided c1"),
    (b"get_paths domain=nosuch&key=x", b"ERR unreg_domain Domain+name+invalid/not+found"),
    (b"get_paths domain=testdom", b"ERR no_key no_key"),
    (b"get_paths domain=testdom&key=missing&callid=abc", b"ERR unknown_key unknown_key abc"),
    (b"file_info domain=testdom&key=", b"ERR no_key no_key"),
    (b"delete domain=testdom&key=missing", b"ERR unknown_key unknown_key"),
    (b"rename domain=testdom&from_key=a", b"ERR no_key no_key"),
    (b"updateclass domain=testdom&key=missing&class=thumb", b"ERR invalid_key invalid_key"),
    (b"updateclass domain=testdom&key=x", b"ERR no_class No+class+provided"),
    (b"updateclass domain=testdom&key=x&class=nosuch", b"ERR class_not_found Class+not+found"),
    (b"create_open domain=testdom&key=x&class=nosuch", b"ERR unreg_class unreg_class"),
    (b"create_close domain=testdom&key=x&devid=1&path=p", b"ERR no_fid no_fid"),
    (b"create_close domain=testdom&key=x&fid=1&path=p", b"ERR no_devid no_devid"),
    (b"create_close domain=testdom&key=x&fid=1&devid=1", b"ERR no_path no_path"),
    (
        b"create_close domain=testdom&key=x&fid=1&devid=1&path=p&checksum=SHA1:00",
        b"ERR invalid_checksum_format invalid_checksum_format",
    ),
    (b"create_close domain=testdom&key=x&fid=1&devid=1&path=p", b"ERR bogus_args bogus_args"),
    (
        b"list_keys domain=testdom&prefix=nomatch/",
        b"ERR none_match No+keys+match+that+pattern+and+after-value+%28if+any%29.",
    ),
    (b"list_keys domain=testdom&prefix=a/&after=b", b"ERR after_mismatch Pattern+does+not+match+the+after-value%3F"),
    (b"list_keys domain=testdom&prefix=a(&after=a(b", b"ERR failure Operation+failed"),
    (b"list_keys domain=testdom&prefix=a(&after=a(b&callid=9", b"ERR failure Operation+failed 9"),
    (b"create_domain domain=testdom", b"ERR domain_exists That+domain+already+exists"),
    (b"create_domain", b"ERR no_domain No+domain+provided"),
    (
        b"create_class domain=testdom&class=avatar&mindevcount=2",
        b"ERR class_exists That+class+already+exists+in+that+domain",
    ),
    (b"create_class domain=nosuch&class=x&mindevcount=1", b"ERR domain_not_found Domain+not+found"),
    (b"create_class domain=testdom&mindevcount=1", b"ERR no_class No+class+provided"),
    (
        b"create_class domain=testdom&class=x&mindevcount=0",
        b"ERR invalid_mindevcount The+mindevcount+must+be+at+least+1",
    ),
    (b"update_class domain=testdom&class=nosuch&mindevcount=1", b"ERR class_not_found Class+not+found"),
]


def test_error_replies_match_mogilefsd(client: LineClient) -> None:
    for line, expected in ERRORS:
        assert client.ask(line) == expected + b"\r\n", line
    assert client.ask(b"noop") == b"OK \r\n"


# -- bad input --------------------------------------------------------------------------------


def test_an_oversized_line_closes_only_that_connection(devmogile: DevMogileFS) -> None:
    with LineClient(devmogile.tracker_address) as flooder, LineClient(devmogile.tracker_address) as other:
        flooder.send(b"get_paths domain=testdom&key=" + b"y" * (70 * 1024))
        assert flooder.closed_within(3)
        assert other.ask(b"noop") == b"OK \r\n"
    with LineClient(devmogile.tracker_address) as fresh:
        assert fresh.ask(b"get_paths domain=testdom&key=" + b"y" * 10000) == b"ERR unknown_key unknown_key\r\n"


def test_clients_leaving_mid_line_or_mid_reply_do_no_harm(devmogile: DevMogileFS) -> None:
    for payload in (b"get_pa", b"noop\r\nnoop\r\nget_domains\r\n" * 50, b"\xff" * 5000 + b"\r\n"):
        with LineClient(devmogile.tracker_address) as leaver:
            leaver.send(payload)
    with LineClient(devmogile.tracker_address) as fine:
        assert fine.ask(b"noop") == b"OK \r\n"


def test_numbers_beyond_64_bits_are_read_as_perl_reads_them(client: LineClient) -> None:
    """Perl reads ``1e999`` as infinity and carries on: a traceback and ``ERR failure`` here."""
    assert upload(client, DOMAIN, "big/number", b"bytes", "avatar") == b"OK \r\n"
    assert len(paths_of(client.call("get_paths", domain=DOMAIN, key="big/number", pathcount="1e999"))) == 2
    assert client.ok("list_keys", domain=DOMAIN, prefix="big/", limit="1e999")["key_1"] == "big/number"
    assert client.ok("list_fids", **{"from": "99999999999999999999999"}) == {"fid_count": "0"}
    assert client.ok("get_devices", devid="1e999") == {"devices": "0"}


# -- storing and replication ------------------------------------------------------------------


def test_create_open_refuses_a_fid_a_file_has_and_create_close_takes_checksum_0_for_none(client: LineClient) -> None:
    """As mogilefsd: an explicit fid must be new and above 0; "0" is Perl's false, so no checksum."""
    assert upload(client, DOMAIN, "fid/kept", b"kept") == b"OK \r\n"
    kept = client.ok("file_info", domain=DOMAIN, key="fid/kept")["fid"]
    for fid in (kept, "-1"):
        assert client.ask(f"create_open domain={DOMAIN}&key=fid/other&fid={fid}".encode()) == \
            b"ERR fid_in_use fid_in_use\r\n"
    assert upload(client, DOMAIN, "fid/sum", b"data", checksum="0") == b"OK \r\n"


def test_upload_replicates_to_mindevcount_before_create_close_answers(client: LineClient) -> None:
    assert upload(client, DOMAIN, "rep/avatar", b"avatar-bytes", "avatar") == b"OK \r\n"
    assert upload(client, DOMAIN, "rep/thumb", b"thumb-bytes", "thumb") == b"OK \r\n"
    assert upload(client, DOMAIN, "rep/default", b"default-bytes") == b"OK \r\n"
    for key, count, body in (
        ("rep/avatar", 2, b"avatar-bytes"),
        ("rep/thumb", 1, b"thumb-bytes"),
        ("rep/default", 2, b"default-bytes"),
    ):
        paths = paths_of(client.call("get_paths", domain=DOMAIN, key=key, noverify=1))
        assert len(set(paths)) == count, (key, paths)
        assert len({path.split("/")[3] for path in paths}) == count  # distinct devices
        assert all(http_request(path).body == body for path in paths)
    info = client.ok("file_info", domain=DOMAIN, key="rep/avatar", devices=1)
    assert (info["devcount"], info["devids"], info["length"], info["class"]) == ("2", "1,2", "12", "avatar")


def test_multi_dest_offers_one_device_per_host(client: LineClient) -> None:
    opened = client.ok("create_open", domain=DOMAIN, key="multi", multi_dest=1)
    assert opened["dev_count"] == "2" and {opened["devid_1"], opened["devid_2"]} == {"1", "2"}
    assert http_request(opened["path_2"], "PUT", b"second").status == 200
    reply = client.call(
        "create_close",
        domain=DOMAIN,
        key="multi",
        fid=opened["fid"],
        devid=opened["devid_2"],
        path=opened["path_2"],
        size=6,
    )
    assert reply == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="multi")["devcount"] == "2"


def test_a_stopped_node_leaves_get_paths_and_comes_back(devmogile: DevMogileFS, client: LineClient) -> None:
    assert upload(client, DOMAIN, "nd/file", b"node-down", "avatar") == b"OK \r\n"
    stopped = devmogile.nodes[0]
    stopped.stop()

    def live_paths() -> list[str]:
        return paths_of(client.call("get_paths", domain=DOMAIN, key="nd/file", noverify=1))

    paths = eventually(live_paths, lambda found: len(found) == 1, timeout=2)
    assert len(paths) == 1 and stopped.url not in paths[0]
    assert client.ok("get_devices")["dev1_observed_state"] == "unreachable"
    assert paths_of(client.call("get_paths", domain=DOMAIN, key="nd/file")) == paths  # verified path too
    for _ in range(5):
        assert client.ok("create_open", domain=DOMAIN, key="nd/new", **{"class": "avatar"})["devid"] == "2"
    assert upload(client, DOMAIN, "nd/lonely", b"one copy", "avatar") == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="nd/lonely")["devcount"] == "1"
    stopped.start()
    assert len(eventually(live_paths, lambda found: len(found) == 2, timeout=2)) == 2
    assert client.ok("get_devices")["dev1_observed_state"] == "writeable"

    def lonely_devcount() -> str:
        return client.ok("file_info", domain=DOMAIN, key="nd/lonely")["devcount"]

    assert eventually(lonely_devcount, lambda count: count == "2", timeout=3) == "2"  # repaired once back
    lonely = paths_of(client.call("get_paths", domain=DOMAIN, key="nd/lonely", noverify=1))
    assert [http_request(path).body for path in lonely] == [b"one copy", b"one copy"]


def test_the_only_copy_on_a_dead_node_is_still_answered(devmogile: DevMogileFS, client: LineClient) -> None:
    assert upload(client, DOMAIN, "backup/file", b"x", "thumb") == b"OK \r\n"
    (path,) = paths_of(client.call("get_paths", domain=DOMAIN, key="backup/file"))
    node = next(node for node in devmogile.nodes if path.startswith(node.url))
    node.stop()
    eventually(lambda: client.ok("get_devices"), lambda devices: "unreachable" in devices.values(), timeout=2)
    assert paths_of(client.call("get_paths", domain=DOMAIN, key="backup/file")) == [path]
    node.start()


def test_size_mismatch_leaves_no_key_and_drops_the_upload(client: LineClient) -> None:
    opened = client.ok("create_open", domain=DOMAIN, key="bad/size", **{"class": "thumb"})
    assert http_request(opened["path"], "PUT", b"12345").status == 200
    reply = client.call(
        "create_close",
        domain=DOMAIN,
        key="bad/size",
        fid=opened["fid"],
        devid=opened["devid"],
        path=opened["path"],
        size=999,
    )
    assert reply == f"ERR size_mismatch Expected:+999%3B+actual:+5%3B+path:+{opened['path']}\r\n".encode()
    assert client.call("get_paths", domain=DOMAIN, key="bad/size") == b"ERR unknown_key unknown_key\r\n"
    assert http_request(opened["path"]).status == 404


def test_create_close_failures(devmogile: DevMogileFS, client: LineClient) -> None:
    opened = client.ok("create_open", domain=DOMAIN, key="cc/x", **{"class": "thumb"})
    other = "1" if opened["devid"] == "2" else "2"
    other_path = opened["path"].replace(f"/dev{opened['devid']}/", f"/dev{other}/")
    other_path = other_path.replace(devmogile.nodes[int(opened["devid"]) - 1].url, devmogile.nodes[int(other) - 1].url)
    close = {"domain": DOMAIN, "key": "cc/x", "fid": opened["fid"]}
    assert (
        client.call("create_close", **close, devid=opened["devid"], path=opened["path"] + "x")
        == b"ERR bogus_args bogus_args\r\n"
    )
    reply = client.call("create_close", **close, devid=other, path=other_path)
    valid = opened["devid"]
    assert (
        reply == f"ERR invalid_destdev File+uploaded+to+invalid+dest+{other}.+Valid+devices+were:+{valid}\r\n".encode()
    )
    again = client.call("create_close", **close, devid=opened["devid"], path=opened["path"])
    assert again == b"ERR no_temp_file No+tempfile+or+file+already+closed\r\n"

    never = client.ok("create_open", domain=DOMAIN, key="cc/never", **{"class": "thumb"})
    reply = client.call(
        "create_close",
        domain=DOMAIN,
        key="cc/never",
        fid=never["fid"],
        devid=never["devid"],
        path=never["path"],
        size=3,
    )
    assert reply.startswith(
        f"ERR size_verify_error Expected:+3%3B+actual:+0+%28missing%29%3B+path:+{never['path']}%3B+error:".encode()
    )

    discarded = client.ok("create_open", domain=DOMAIN, key="cc/gone", **{"class": "thumb"})
    assert http_request(discarded["path"], "PUT", b"abc").status == 200
    args = {"fid": discarded["fid"], "devid": discarded["devid"], "path": discarded["path"]}
    assert client.call("create_close", domain=DOMAIN, key="", **args) == b"OK \r\n"
    assert http_request(discarded["path"]).status == 404

    down = client.ok("create_open", domain=DOMAIN, key="cc/down", **{"class": "thumb"})
    devmogile.nodes[int(down["devid"]) - 1].stop()
    reply = client.call(
        "create_close", domain=DOMAIN, key="cc/down", fid=down["fid"], devid=down["devid"], path=down["path"]
    )
    assert reply.startswith(b"ERR size_verify_error Expected:+-1%3B+actual:+0+%28cantreach%29")


def test_overwriting_a_key_drops_the_old_copies(client: LineClient) -> None:
    assert upload(client, DOMAIN, "ow/key", b"first", "avatar") == b"OK \r\n"
    old_paths = paths_of(client.call("get_paths", domain=DOMAIN, key="ow/key", noverify=1))
    assert upload(client, DOMAIN, "ow/key", b"second!", "avatar") == b"OK \r\n"
    new_paths = paths_of(client.call("get_paths", domain=DOMAIN, key="ow/key", noverify=1))
    assert not set(old_paths) & set(new_paths)
    assert [http_request(path).status for path in old_paths] == [404, 404]
    assert {http_request(path).body for path in new_paths} == {b"second!"}


def test_delete_removes_the_data(client: LineClient) -> None:
    assert upload(client, DOMAIN, "del/key", b"bye", "avatar") == b"OK \r\n"
    paths = paths_of(client.call("get_paths", domain=DOMAIN, key="del/key", noverify=1))
    assert client.call("delete", domain=DOMAIN, key="del/key") == b"OK \r\n"
    assert client.call("delete", domain=DOMAIN, key="del/key") == b"ERR unknown_key unknown_key\r\n"
    assert [http_request(path).status for path in paths] == [404, 404]


def test_rename_to_an_existing_key_answers_exactly_one_line(client: LineClient) -> None:
    assert upload(client, DOMAIN, "rn/src", b"src", "thumb") == b"OK \r\n"
    assert upload(client, DOMAIN, "rn/existing", b"existing", "thumb") == b"OK \r\n"
    reply = client.call("rename", domain=DOMAIN, from_key="rn/src", to_key="rn/existing")
    assert reply == b"ERR key_exists Target+key+name+already+exists%3B+can%27t+overwrite.\r\n"
    assert client.silent_for(0.3)
    assert client.ask(b"noop") == b"OK \r\n"
    assert client.call("rename", domain=DOMAIN, from_key="rn/src", to_key="rn/src") == b"OK \r\n"
    assert client.call("rename", domain=DOMAIN, from_key="rn/src", to_key="rn/dst") == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="rn/dst")["length"] == "3"


def test_updateclass_replicates_to_the_new_mindevcount(client: LineClient) -> None:
    assert upload(client, DOMAIN, "uc/file", b"grow", "thumb") == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="uc/file")["devcount"] == "1"
    assert client.call("updateclass", domain=DOMAIN, key="uc/file", **{"class": "avatar"}) == b"OK \r\n"
    info = client.ok("file_info", domain=DOMAIN, key="uc/file")
    assert (info["class"], info["devcount"]) == ("avatar", "2")


def test_updateclass_to_fewer_copies_drops_the_extra_ones(client: LineClient) -> None:
    """As mogilefsd's replicator does with a file that has more copies than its class keeps."""
    assert upload(client, DOMAIN, "uc/shrink", b"shrink", "avatar") == b"OK \r\n"
    before = paths_of(client.call("get_paths", domain=DOMAIN, key="uc/shrink", noverify=1))
    assert client.call("updateclass", domain=DOMAIN, key="uc/shrink", **{"class": "thumb"}) == b"OK \r\n"
    info = client.ok("file_info", domain=DOMAIN, key="uc/shrink")
    assert (info["class"], info["devcount"]) == ("thumb", "1")
    (kept,) = paths_of(client.call("get_paths", domain=DOMAIN, key="uc/shrink", noverify=1))
    (dropped,) = set(before) - {kept}
    assert http_request(kept).body == b"shrink" and http_request(dropped).status == 404


def test_md5_classes_keep_and_verify_checksums(client: LineClient) -> None:
    created = client.ok("create_class", domain=DOMAIN, **{"class": "hashed"}, mindevcount=2, hashtype="MD5")
    assert created == {"class": "hashed", "mindevcount": "2", "domain": DOMAIN}
    good = "MD5:5eb63bbbe01eeed093cb22bb8f5acdc3"  # hello world
    assert upload(client, DOMAIN, "md5/ok", b"hello world", "hashed", checksum=good, checksumverify=1) == b"OK \r\n"
    assert client.ok("file_info", domain=DOMAIN, key="md5/ok")["checksum"] == good
    assert client.ok("file_debug", domain=DOMAIN, key="md5/ok")["checksum"] == good
    bad = "MD5:" + "0" * 32
    reply = upload(client, DOMAIN, "md5/bad", b"hello world", "hashed", checksum=bad, checksumverify=1)
    # mogilefsd prints its checksum object there (MogileFS::Checksum's as_string)
    assert re.match(rf"ERR checksum_mismatch Expected:\+Checksum%5Bf%3D\d+%3BMD5%3D{'0' * 32}%5D%3B\+actual:\+"
                    rf"{good}%3B\+path:\+".encode(), reply), reply
    assert upload(client, DOMAIN, "md5/unsent", b"abc", "hashed") == b"OK \r\n"  # computed while replicating
    assert client.ok("file_info", domain=DOMAIN, key="md5/unsent")["checksum"] == "MD5:900150983cd24fb0d6963f7d28e17f72"


def test_concurrent_clients(devmogile: DevMogileFS) -> None:
    errors: list[BaseException] = []

    def work(number: int) -> None:
        try:
            with LineClient(devmogile.tracker_address) as own:
                for item in range(5):
                    data = f"{number}-{item}".encode() * 100
                    assert upload(own, DOMAIN, f"conc/{number}/{item}", data, "avatar") == b"OK \r\n"
                    assert own.ok("file_info", domain=DOMAIN, key=f"conc/{number}/{item}")["devcount"] == "2"
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    with LineClient(devmogile.tracker_address) as check:
        assert check.ok("list_keys", domain=DOMAIN, prefix="conc/")["key_count"] == "40"


# -- restarts ---------------------------------------------------------------------------------


def test_state_survives_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with DevMogileFS(data_dir, domains={DOMAIN: CLASSES}) as first, LineClient(first.tracker_address) as client:
        assert client.ok("create_class", domain=DOMAIN, **{"class": "extra"}, mindevcount=1)
        assert upload(client, DOMAIN, "keep/me", b"persistent", "avatar") == b"OK \r\n"
        first_fid = int(client.ok("file_info", domain=DOMAIN, key="keep/me")["fid"])
        old_ports = [node.port for node in first.nodes]
    with DevMogileFS(data_dir, domains={DOMAIN: {"avatar": 2}}) as second, LineClient(second.tracker_address) as client:
        assert [node.port for node in second.nodes] != old_ports
        paths = paths_of(client.call("get_paths", domain=DOMAIN, key="keep/me"))
        assert len(paths) == 2 and all(http_request(path).body == b"persistent" for path in paths)
        assert {path.split("/")[2] for path in paths} == {node.url.split("/")[2] for node in second.nodes}
        domains = client.ok("get_domains")
        assert {"avatar", "thumb", "extra", "default"} == {v for k, v in domains.items() if k.endswith("name")}
        assert int(client.ok("create_open", domain=DOMAIN, key="next")["fid"]) > first_fid


def test_the_first_client_to_connect_finds_the_configured_domains(tmp_path: Path) -> None:
    """A client that connects the moment the port accepts (as scripts starting a tracker do);
    three starts, as the moment is short."""
    for start in range(3):
        port = free_port()
        first_reply: list[bytes] = []

        def connect_at_once() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with LineClient(("127.0.0.1", port)) as client:
                        first_reply.append(client.call("get_domains"))
                        return
                except OSError:
                    continue

        thread = threading.Thread(target=connect_at_once)
        thread.start()
        try:
            with DevMogileFS(tmp_path / f"data{start}", tracker_port=port, domains={DOMAIN: CLASSES}):
                thread.join(10)
        finally:
            thread.join(10)
        [reply] = first_reply
        assert decode_args(reply[3:].rstrip(b"\r\n")).get("domain1") == DOMAIN, reply


def test_a_temporary_data_dir_is_removed_on_stop() -> None:
    mogile = DevMogileFS(storage_nodes=1).start()
    assert mogile.data_dir is not None and (mogile.data_dir / "stor1").is_dir()
    data_dir = mogile.data_dir
    with LineClient(mogile.tracker_address) as client:
        assert client.ok("get_devices")["devices"] == "1"
    mogile.stop()
    assert not data_dir.exists()


def test_tracker_can_be_stopped_and_started_on_the_same_port(devmogile: DevMogileFS) -> None:
    with LineClient(devmogile.tracker_address) as client:
        assert upload(client, DOMAIN, "failover", b"data", "thumb") == b"OK \r\n"
        address = devmogile.tracker_address
        devmogile.stop_tracker()
        assert client.closed_within(2)
    with pytest.raises(ConnectionRefusedError):
        LineClient(address)
    devmogile.start_tracker()
    assert devmogile.tracker_address == address
    with LineClient(address) as client:
        assert client.ok("file_info", domain=DOMAIN, key="failover")["length"] == "4"


# -- command line -----------------------------------------------------------------------------


def test_command_line_serves_until_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "mogile_middleware", "devserver", "--port", "0", "--storage-ports", "0,0"]
    command += ["--data", str(tmp_path / "cli"), "--domain", "media", "--class", "image=2", "--class", "thumb=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path, text=True
    )
    try:
        assert process.stdout is not None
        tracker_line = process.stdout.readline().split()
        assert tracker_line[0] == "tracker", tracker_line
        host, port = tracker_line[1].rsplit(":", 1)
        storage = [process.stdout.readline().split()[2] for _ in range(2)]
        assert all(url.startswith("http://127.0.0.1:") for url in storage)
        with LineClient((host, int(port))) as client:
            domains = client.ok("get_domains")
            assert domains["domain1"] == "media" and domains["domain1classes"] == "3"
            assert upload(client, "media", "cli/key", b"via cli", "image") == b"OK \r\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_command_line_layout_options() -> None:
    args = build_parser().parse_args(["devserver", "--domain", "a", "--class", "x=2", "--domain", "b", "--class", "y=1"])
    assert args.domains == {"a": {"x": 2}, "b": {"y": 1}}
    assert args.storage_ports == [7500, 7502] and args.port == 7001
    for bad in (["--class", "x=1"], ["--domain", "a", "--class", "x"], ["--storage-ports", "7500,abc"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["devserver", *bad])
