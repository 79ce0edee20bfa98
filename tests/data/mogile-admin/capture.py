"""Record the admin exchanges of ``admin.jsonl`` / ``admin.txt`` from a real mogilefsd 2.73.

Run against a freshly set-up lab (hosts store1/store2 on 127.0.0.1:7500/7502 with dev1/dev2,
domain testdom with classes avatar 2 and thumb 1, nothing else), standard library only:

    python3 capture.py --tracker 127.0.0.1:7001 --docroot1 /tmp/mmlab/var/mogstored1 --out .

Steps marked ``setup`` are done off the wire and recorded as actions the replay repeats: storing
a key (create_open, PUT, create_close), creating a device directory on storage node 1 (here
followed by waiting for mogstored to write its usage file, up to 10 s), and polling get_devices
until the monitor has seen a device (observed state and disk figures).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import time
from pathlib import Path
from urllib.parse import unquote_plus, urlsplit

#: (title, request line) or (title, setup action); the order is the capture order.
STEPS: list[tuple[str, str | dict[str, object]]] = [
    ("server_settings on a fresh database", "server_settings"),
    ("server_setting schema_version", "server_setting key=schema_version"),
    ("server_setting without key", "server_setting"),
    ("server_setting of an unset key", "server_setting key=nosuch"),
    ("get_hosts", "get_hosts"),
    ("get_devices (disk figures from the usage files)", "get_devices"),
    ("get_devices devid=1", "get_devices devid=1"),
    ("GET /dev1/usage", {"http_get": "/dev1/usage"}),
    # domains and classes
    ("create_domain admdom", "create_domain domain=admdom"),
    ("create_class admdom c1", "create_class domain=admdom&class=c1&mindevcount=1"),
    ("delete_domain without domain", "delete_domain"),
    ("delete_domain unknown domain", "delete_domain domain=nosuch"),
    ("delete_domain unknown domain with callid", "delete_domain domain=nosuch&callid=9"),
    ("delete_domain with a class", "delete_domain domain=admdom"),
    ("store admkey in admdom class c1", {"upload": {"domain": "admdom", "key": "admkey", "class": "c1"}}),
    ("delete_class with a file", "delete_class domain=admdom&class=c1"),
    ("delete_domain with a file", "delete_domain domain=admdom"),
    ("delete_class without domain", "delete_class"),
    ("delete_class without class", "delete_class domain=admdom"),
    ("delete_class default", "delete_class domain=admdom&class=default"),
    ("delete_class unknown domain", "delete_class domain=nosuch&class=c1"),
    ("delete_class unknown class", "delete_class domain=admdom&class=nosuch"),
    ("delete the file", "delete domain=admdom&key=admkey"),
    ("delete_class c1", "delete_class domain=admdom&class=c1"),
    ("delete_class c1 again", "delete_class domain=admdom&class=c1"),
    ("update_class default (stores the default class)", "update_class domain=admdom&class=default&mindevcount=3"),
    ("get_domains", "get_domains"),
    ("delete_domain with only the default class", "delete_domain domain=admdom"),
    ("delete_domain again", "delete_domain domain=admdom"),
    # hosts
    ("create_host without host", "create_host"),
    ("create_host without ip", "create_host host=admhost"),
    ("create_host without port", "create_host host=admhost&ip=127.0.0.1"),
    ("create_host bad status", "create_host host=admhost&ip=127.0.0.1&port=7600&status=bogus"),
    ("create_host existing host", "create_host host=store1&ip=127.0.0.1&port=7500"),
    ("create_host admhost", "create_host host=admhost&ip=127.0.0.1&port=7600"),
    ("get_hosts hostid=3 (new host is down)", "get_hosts hostid=3"),
    ("update_host unknown host", "update_host host=nosuch&status=alive"),
    ("update_host without host", "update_host status=alive"),
    ("update_host status drain (not a host state)", "update_host host=admhost&status=drain"),
    (
        "update_host readonly, getport, altip, altmask",
        "update_host host=admhost&status=readonly&getport=7601&altip=10.0.0.1&altmask=10.0.0.0/8",
    ),
    ("get_hosts hostid=3 after update", "get_hosts hostid=3"),
    ("update_host port and dead", "update_host host=admhost&port=7602&status=dead"),
    ("get_hosts hostid=3 dead", "get_hosts hostid=3"),
    ("get_hosts hostid=99", "get_hosts hostid=99"),
    # devices
    ("create_device 5 on admhost", "create_device devid=5&hostname=admhost"),
    ("get_devices devid=5 (never observed)", "get_devices devid=5"),
    ("create_device existing devid", "create_device devid=5&hostname=admhost"),
    ("create_device unknown hostname", "create_device devid=6&hostname=nosuch"),
    ("create_device unknown hostid", "create_device devid=6&hostid=99"),
    ("create_device without host", "create_device devid=6"),
    ("create_device non-numeric devid", "create_device devid=abc&hostname=admhost"),
    ("create_device without devid", "create_device hostname=admhost"),
    ("create_device bad state", "create_device devid=6&hostname=admhost&state=bogus"),
    ("create_device 6 by hostid, down", "create_device devid=6&hostid=3&state=down"),
    ("get_devices devid=6", "get_devices devid=6"),
    ("delete_host with devices", "delete_host host=admhost"),
    ("delete_host unknown host", "delete_host host=nosuch"),
    ("delete_host without host", "delete_host"),
    ("create_host emptyhost", "create_host host=emptyhost&ip=127.0.0.1&port=7700&status=alive"),
    ("delete_host emptyhost", "delete_host host=emptyhost"),
    ("get_hosts hostid=4 after delete", "get_hosts hostid=4"),
    # device states and weights
    ("set_state without args", "set_state"),
    ("set_state without state", "set_state host=admhost&device=5"),
    ("set_state unknown state", "set_state host=admhost&device=5&state=bogus"),
    ("set_state upper-case state", "set_state host=admhost&device=5&state=ALIVE"),
    ("set_state unknown device", "set_state host=admhost&device=99&state=down"),
    ("set_state wrong host", "set_state host=store1&device=5&state=down"),
    ("set_state dead", "set_state host=admhost&device=5&state=dead"),
    ("set_state dead to alive", "set_state host=admhost&device=5&state=alive"),
    ("set_state dead to readonly", "set_state host=admhost&device=5&state=readonly"),
    ("set_state readonly to alive", "set_state host=admhost&device=5&state=alive"),
    ("set_state drain", "set_state host=admhost&device=5&state=drain"),
    ("set_weight without args", "set_weight"),
    ("set_weight without weight (0)", "set_weight host=admhost&device=5"),
    ("set_weight negative", "set_weight host=admhost&device=5&weight=-1"),
    ("set_weight non-numeric (0)", "set_weight host=admhost&device=5&weight=abc"),
    ("set_weight unknown device", "set_weight host=admhost&device=99&weight=50"),
    ("set_weight wrong host", "set_weight host=store1&device=5&weight=50"),
    ("set_weight 50", "set_weight host=admhost&device=5&weight=50"),
    ("get_devices devid=5 after state and weight", "get_devices devid=5"),
    # a device added to a running storage node
    ("create_device 3 on store1 without a dev3 directory", "create_device devid=3&hostname=store1"),
    ("get_devices devid=3 (no dev3 on the node)", "get_devices devid=3"),
    ("mkdir dev4 on storage node 1", {"mkdir": {"node": 1, "dir": "dev4"}}),
    ("create_device 4 on store1", "create_device devid=4&hostname=store1"),
    ("wait until the monitor saw dev4", {"await_device": {"devid": 4, "observed_state": "writeable"}}),
    ("get_devices devid=4 (observed writeable, disk figures)", "get_devices devid=4"),
    ("set_state dev4 down", "set_state host=store1&device=4&state=down"),
    ("get_devices devid=4 down", "get_devices devid=4"),
    # server settings
    ("set_server_setting without key", "set_server_setting"),
    ("set_server_setting unknown key", "set_server_setting key=bogus&value=1"),
    ("set_server_setting memcache_ttl non-numeric", "set_server_setting key=memcache_ttl&value=abc"),
    ("set_server_setting memcache_ttl 60", "set_server_setting key=memcache_ttl&value=60"),
    ("set_server_setting skip_mkcol maybe", "set_server_setting key=skip_mkcol&value=maybe"),
    ("set_server_setting skip_mkcol yes", "set_server_setting key=skip_mkcol&value=yes"),
    ("set_server_setting case_sensitive_list_keys off", "set_server_setting key=case_sensitive_list_keys&value=off"),
    ("set_server_setting zone_ bad netmask", "set_server_setting key=zone_foo&value=notanetmask"),
    ("set_server_setting zone_ netmasks", "set_server_setting key=zone_foo&value=10.0.0.0/8,192.168.0.0/16"),
    ("set_server_setting fsck_checksum SHA1", "set_server_setting key=fsck_checksum&value=SHA1"),
    ("set_server_setting fsck_checksum MD5", "set_server_setting key=fsck_checksum&value=MD5"),
    ("set_server_setting slave_foo", "set_server_setting key=slave_foo&value=x"),
    ("set_server_setting queue_ anything", "set_server_setting key=queue_rate_for_fsck&value=10"),
    ("server_settings after setting", "server_settings"),
    ("server_setting fsck_checksum", "server_setting key=fsck_checksum"),
    ("server_setting slave_version", "server_setting key=slave_version"),
    ("set_server_setting slave_foo blank (deleted)", "set_server_setting key=slave_foo&value="),
    ("set_server_setting memcache_ttl without value (0)", "set_server_setting key=memcache_ttl"),
    ("set_server_setting fsck_checksum class (deleted)", "set_server_setting key=fsck_checksum&value=class"),
    ("set_server_setting network_zones blank", "set_server_setting key=network_zones&value="),
    ("set_server_setting with callid", "set_server_setting key=skip_devcount&value=on&callid=5"),
    ("server_settings at the end", "server_settings"),
    # the rest
    ("replicate_now", "replicate_now"),
    ("clear_cache", "clear_cache"),
    ("clear_cache all=1 (arguments are echoed)", "clear_cache all=1"),
    ("clear_cache with callid", "clear_cache callid=3"),
]


def escape(data: bytes) -> str:
    """The transcript escaping of ``tests/data/mogile-wire/README.md``."""
    out = []
    for byte in data:
        char = chr(byte)
        if char == "\\":
            out.append("\\\\")
        elif char == "\r":
            out.append("\\r")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif 0x20 <= byte <= 0x7E:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


class Tracker:
    """One connection to the tracker, one reply line per request line."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.replies = self.sock.makefile("rb")

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        return self.replies.readline()

    def ok(self, line: str) -> dict[str, str]:
        reply = self.ask(line.encode() + b"\r\n")
        if not reply.startswith(b"OK "):
            raise RuntimeError(f"{line} -> {reply!r}")
        pairs = (item.split("=", 1) for item in reply[3:].decode().strip().split("&") if item)
        return {unquote_plus(name): unquote_plus(value) for name, value in pairs}


def upload(tracker: Tracker, domain: str, key: str, cls: str) -> None:
    opened = tracker.ok(f"create_open domain={domain}&key={key}&class={cls}")
    url = urlsplit(opened["path"])
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    conn.request("PUT", url.path, body=b"admin")
    assert conn.getresponse().status == 200
    conn.close()
    tracker.ok(f"create_close domain={domain}&key={key}&fid={opened['fid']}&devid={opened['devid']}"
               f"&path={opened['path']}&size=5")


def await_usage(node: str, path: str) -> None:
    """Wait until mogstored has written a usage file (every 10 s)."""
    host, port = node.rsplit(":", 1)
    for _ in range(60):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        if status == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"no {path} on {node}")


def await_device(tracker: Tracker, devid: int, observed_state: str) -> None:
    """Poll get_devices until the monitor has seen the device: its state and its disk figures."""
    for _ in range(120):
        device = tracker.ok(f"get_devices devid={devid}")
        if device["dev1_observed_state"] == observed_state and device["dev1_mb_total"]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"dev{devid} never became {observed_state}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracker", default="127.0.0.1:7001")
    parser.add_argument("--node1", default="127.0.0.1:7500", help="storage node 1 (HTTP)")
    parser.add_argument("--docroot1", type=Path, required=True, help="docroot of storage node 1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    options = parser.parse_args()
    host, port = options.tracker.rsplit(":", 1)
    tracker = Tracker((host, int(port)))
    records, text = [], ["# mogilefsd 2.73 admin commands (see README.md); one tracker connection", ""]
    for n, (title, step) in enumerate(STEPS, 1):
        text.append(f"## {title}")
        record: dict[str, object] = {"n": n, "title": title}
        if isinstance(step, dict):
            if "upload" in step:
                spec = step["upload"]
                upload(tracker, spec["domain"], spec["key"], spec["class"])  # type: ignore[index]
            elif "mkdir" in step:
                directory = step["mkdir"]["dir"]  # type: ignore[index]
                (options.docroot1 / directory).mkdir()
                await_usage(options.node1, f"/{directory}/usage")
            elif "await_device" in step:
                await_device(tracker, **step["await_device"])  # type: ignore[arg-type]
            if "http_get" not in step:
                text.append(f"# setup (unrecorded): {json.dumps(step)}")
                record["setup"] = step
                records.append(record)
                text.append("")
                continue
            node_host, node_port = options.node1.rsplit(":", 1)
            sent = f"GET {step['http_get']} HTTP/1.0\r\n\r\n".encode()
            with socket.create_connection((node_host, int(node_port)), timeout=30) as sock:
                sock.sendall(sent)
                received = b"".join(iter(lambda: sock.recv(65536), b""))
            record["conn"] = "http:node1"
        else:
            sent = step.encode() + b"\r\n"
            received = tracker.ask(sent)
            record["conn"] = "tracker"
        record.update(sent=escape(sent), recv=escape(received), sent_hex=sent.hex(), recv_hex=received.hex())
        records.append(record)
        text.extend(f"> {line}" for line in escape(sent).replace("\\n", "\\n\n").splitlines())
        text.extend(f"< {line}" for line in escape(received).replace("\\n", "\\n\n").splitlines())
        text.append("")
    (options.out / "admin.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (options.out / "admin.txt").write_text("\n".join(text))


if __name__ == "__main__":
    main()
