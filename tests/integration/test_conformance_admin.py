"""Conformance: the real mogilefsd 2.73's admin replies (tests/data/mogile-admin), replayed against the dev MogileFS.

Every exchange of ``admin.jsonl`` is sent again in capture order on one tracker connection, after
the setup steps recorded with it (storing a key, creating a device directory on storage node 1,
waiting until the monitor has seen a device). The lab's hosts store1/store2 (ports 7500/7502)
are ours, stor1/stor2 on their ports; ids are compared as they are, since both start from the same
state (two hosts with one device each, domain testdom with classes avatar and thumb).

Compared: ERR lines byte for byte; OK lines by their arguments, with the groups whose numbering
is arbitrary (hosts, devices, domains and their classes, settings) compared as sets, and disk
figures (``mb_total``, ``mb_used``, ``mb_free``) only for being a number or empty, as the real
tracker's come from another disk. The usage file fetched from storage node 1 must have the same
fields in the same order with the same kinds of values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import DOMAIN
from integration._wire_client import LineClient, eventually, http_request, upload

from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.protocol import decode_args

ADMIN_DIR = Path(__file__).resolve().parents[1] / "data" / "mogile-admin"
#: The lab's host names and ours, by storage node number (the lab's node N has port 7500 + 2(N-1)).
HOST_NAMES = {b"store1": b"stor1", b"store2": b"stor2"}
LAB_PORTS = {"7500": 0, "7502": 1}
FIGURES = re.compile(r"dev\d+_mb_(total|used|free)")


def load_exchanges() -> list[dict[str, object]]:
    """The records of ``admin.jsonl`` in capture order."""
    lines = (ADMIN_DIR / "admin.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def canonical(args: dict[str, str]) -> dict[str, object]:
    """OK arguments with arbitrarily numbered groups as sorted lists (domains by name, settings as a dict)."""
    flat: dict[str, object] = {}
    groups: dict[tuple[str, str], dict[str, str]] = {}
    domain_names: dict[str, str] = {}
    classes: dict[str, list[list[tuple[str, str]]]] = {}
    settings: dict[str, dict[str, str]] = {}
    for name, value in args.items():
        if FIGURES.fullmatch(name):
            value = "<number>" if value.isdigit() else value
        if match := re.fullmatch(r"(host|dev)(\d+)_(\w+)", name):
            groups.setdefault((match.group(1), match.group(2)), {})[match.group(3)] = value
        elif match := re.fullmatch(r"domain(\d+)class(\d+)(\w+)", name):
            groups.setdefault((f"domain{match.group(1)}class", match.group(2)), {})[match.group(3)] = value
        elif match := re.fullmatch(r"domain(\d+)", name):
            domain_names[match.group(1)] = value
        elif match := re.fullmatch(r"(key|value)_(\d+)", name):
            settings.setdefault(match.group(2), {})[match.group(1)] = value
        else:
            flat[name] = value
    for (kind, _), fields in groups.items():
        if kind.startswith("domain"):
            domain = domain_names.get(kind[len("domain") : -len("class")], kind)
            classes.setdefault(domain, []).append(sorted(fields.items()))
        else:
            flat.setdefault(kind, []).append(sorted(fields.items()))  # type: ignore[union-attr]
    for kind in ("host", "dev"):
        if kind in flat:
            flat[kind] = sorted(flat[kind])  # type: ignore[type-var]
    if domain_names:
        flat["domains*"] = {name: sorted(classes.get(name, [])) for name in domain_names.values()}
    if settings:
        flat["settings*"] = {pair["key"]: pair.get("value", "") for pair in settings.values()}
    return flat


class AdminReplay:
    """Replays the admin exchanges against a :class:`DevMogileFS`, collecting every mismatch."""

    def __init__(self, mogile: DevMogileFS) -> None:
        self.mogile = mogile
        self.client = LineClient(mogile.tracker_address)
        self.mismatches: list[str] = []
        self.compared = 0

    def close(self) -> None:
        self.client.close()

    def run(self, records: list[dict[str, object]]) -> None:
        for record in records:
            if "setup" in record:
                self._setup(record["setup"])  # type: ignore[arg-type]
            elif record["conn"] == "tracker":
                self._tracker(record)
            else:
                self._usage_file(record)

    def _fail(self, record: dict[str, object], message: str) -> None:
        self.mismatches.append(f"#{record['n']} [{record['title']}]: {message}")

    def _setup(self, step: dict[str, dict[str, object]]) -> None:
        if "upload" in step:
            spec = step["upload"]
            reply = upload(self.client, str(spec["domain"]), str(spec["key"]), b"admin", str(spec["class"]))
            assert reply == b"OK \r\n", reply
        elif "mkdir" in step:
            node = self.mogile.nodes[int(step["mkdir"]["node"]) - 1]  # type: ignore[call-overload]
            (node.docroot / str(step["mkdir"]["dir"])).mkdir()
        elif "await_device" in step:
            devid, state = step["await_device"]["devid"], step["await_device"]["observed_state"]
            device = eventually(
                lambda: self.client.ok("get_devices", devid=str(devid)),
                lambda seen: seen["dev1_observed_state"] == state and bool(seen["dev1_mb_total"]),
                timeout=10,
            )
            assert device["dev1_observed_state"] == state, device

    def _tracker(self, record: dict[str, object]) -> None:
        sent, expected = bytes.fromhex(str(record["sent_hex"])), bytes.fromhex(str(record["recv_hex"]))
        for lab, ours in HOST_NAMES.items():
            sent, expected = sent.replace(lab, ours), expected.replace(lab, ours)
        self.client.send(sent)
        actual = self.client.read_line()
        self.compared += 1
        if not (expected.startswith(b"OK ") and actual.startswith(b"OK ")):
            if expected != actual:
                self._fail(record, f"expected {expected!r}, got {actual!r}")
            return
        want, got = canonical(self._our_ports(_ok_args(expected))), canonical(_ok_args(actual))
        if want != got:
            diff = {name: (want.get(name), got.get(name)) for name in {*want, *got} if want.get(name) != got.get(name)}
            self._fail(record, f"differs (expected, got): {diff!r}")

    def _our_ports(self, args: dict[str, str]) -> dict[str, str]:
        """The lab's storage ports in ``hostN_http_port`` replaced by our nodes' ports."""
        return {
            name: str(self.mogile.nodes[LAB_PORTS[value]].port)
            if re.fullmatch(r"host\d+_http_port", name) and value in LAB_PORTS
            else value
            for name, value in args.items()
        }

    def _usage_file(self, record: dict[str, object]) -> None:
        """The usage file of our node 1, compared with the lab's by field names, order and kinds of values."""
        path = re.match(rb"GET (\S+) ", bytes.fromhex(str(record["sent_hex"])))
        assert path is not None
        reply = http_request(self.mogile.nodes[0].url + path.group(1).decode())
        expected_body = bytes.fromhex(str(record["recv_hex"])).split(b"\r\n\r\n", 1)[1]
        self.compared += 1
        if reply.status != 200 or reply.headers.get("content-type") != "text/plain":
            self._fail(record, f"status {reply.status}, Content-Type {reply.headers.get('content-type')}")
        want, got = _usage_fields(expected_body), _usage_fields(reply.body)
        if [name for name, _ in want] != [name for name, _ in got]:
            self._fail(record, f"fields {got!r}, expected {want!r}")
        for (name, value), (_, ours) in zip(want, got):
            if _kind(name, value) != _kind(name, ours):
                self._fail(record, f"{name}: {ours!r} is not like {value!r}")


def _ok_args(line: bytes) -> dict[str, str]:
    return decode_args(line[3:].rstrip(b"\r\n"))


def _usage_fields(body: bytes) -> list[tuple[str, str]]:
    return [(name, value.strip()) for name, _, value in (line.partition(": ") for line in body.decode().splitlines())]


def _kind(name: str, value: str) -> str:
    """What a usage field's value looks like: a number, a percentage, a device directory or a name."""
    if re.fullmatch(r"\d+", value):
        return "number"
    if re.fullmatch(r"\d+%", value):
        return "percent"
    if name == "disk" and re.search(r"/dev\d+$", value):
        return "device directory"
    return "text" if value else "empty"


def test_transcript_is_complete() -> None:
    records = load_exchanges()
    assert [record["n"] for record in records] == list(range(1, len(records) + 1))
    assert len({record["title"] for record in records}) == len(records)
    recorded = [record for record in records if "setup" not in record]
    assert all(bytes.fromhex(str(record["recv_hex"])) for record in recorded)
    text = (ADMIN_DIR / "admin.txt").read_text()
    assert all(f"## {record['title']}\n" in text for record in records)


def test_replayed_admin_transcript_matches_the_real_tracker(devmogile: DevMogileFS) -> None:
    records = load_exchanges()
    replay = AdminReplay(devmogile)
    try:
        replay.run(records)
    finally:
        replay.close()
    assert not replay.mismatches, "\n".join(replay.mismatches)
    assert replay.compared == sum("setup" not in record for record in records)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            {"domains": "1", "domain1": "d", "domain1classes": "1", "domain1class1name": "c"},
            {"domains": "1", "domain1classes": "1", "domains*": {"d": [[("name", "c")]]}},
            id="domains",
        ),
        pytest.param(
            {"key_count": "2", "key_1": "a", "value_1": "1", "key_2": "b", "value_2": ""},
            {"key_count": "2", "settings*": {"a": "1", "b": ""}},
            id="settings",
        ),
        pytest.param(
            {"devices": "1", "dev1_devid": "4", "dev1_mb_total": "103897", "dev1_mb_free": ""},
            {"devices": "1", "dev": [[("devid", "4"), ("mb_free", ""), ("mb_total", "<number>")]]},
            id="figures",
        ),
    ],
)
def test_canonical_form(args: dict[str, str], expected: dict[str, object]) -> None:
    assert canonical(args) == expected


def test_the_fixture_matches_the_capture_setup(devmogile: DevMogileFS) -> None:
    with LineClient(devmogile.tracker_address) as client:
        hosts = client.ok("get_hosts")
        domains = client.ok("get_domains")
    assert {hosts["host1_hostname"], hosts["host2_hostname"]} == {name.decode() for name in HOST_NAMES.values()}
    assert domains["domain1"] == DOMAIN
