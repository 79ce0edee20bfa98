"""The protocol layer against the bytes a real mogilefsd 2.73 sent and received."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mogile_middleware import exceptions
from mogile_middleware.client import file_info_of, paths_of
from mogile_middleware.protocol import (
    check_any_key,
    check_key,
    decode_args,
    encode_request,
    format_err,
    format_ok,
    parse_reply,
    parse_request,
)

WIRE = Path(__file__).parent.parent / "data" / "mogile-wire" / "all.jsonl"
EXCHANGES = [json.loads(line) for line in WIRE.read_text().splitlines()]


def reply_lines(exchange: dict) -> list[bytes]:
    """The tracker's reply lines of one exchange (admin ``!`` replies are not protocol lines)."""
    if bytes.fromhex(exchange["sent_hex"]).lstrip().startswith(b"!"):
        return []
    return bytes.fromhex(exchange["recv_hex"]).splitlines(keepends=True)


OK_LINES = [line for ex in EXCHANGES for line in reply_lines(ex) if line.startswith(b"OK")]
ERR_LINES = [line for ex in EXCHANGES for line in reply_lines(ex) if line.startswith(b"ERR")]


def test_transcripts_hold_both_kinds_of_reply() -> None:
    assert len(OK_LINES) > 100 and len(ERR_LINES) > 50


@pytest.mark.parametrize("line", OK_LINES, ids=lambda line: line[:40].decode("latin-1"))
def test_ok_reply_decodes_and_reencodes_byte_for_byte(line: bytes) -> None:
    # format_ok is mogilefsd's eurl: re-encoding the decoded reply gives the captured bytes back.
    assert format_ok(parse_reply(line)) == line


@pytest.mark.parametrize("line", ERR_LINES, ids=lambda line: line[:40].decode("latin-1"))
def test_err_reply_raises_the_named_exception_and_reencodes(line: bytes) -> None:
    with pytest.raises(exceptions.TrackerError) as raised:
        parse_reply(line)
    error = raised.value
    code = line.split(b" ")[1].decode()
    assert error.code == code
    assert type(error) is exceptions._ERRORS_BY_CODE.get(code, exceptions.TrackerError)
    callid = line.rstrip(b"\r\n").split(b" ")[3].decode() if line.count(b" ") == 3 else None
    assert format_err(error.code, error.text, callid) == line


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(b"OK \r\n", {}, id="empty-ok"),
        pytest.param(b"OK callid=42\r\n", {"callid": "42"}, id="callid"),
        pytest.param(
            b"OK key=enc/caf%C3%A9-%E6%97%A5%E6%9C%AC&fid=34\r\n",
            {"key": "enc/café-日本", "fid": "34"},
            id="utf8-key",
        ),
        pytest.param(b"OK key=enc/a,b:c\\d%7Ee\r\n", {"key": "enc/a,b:c\\d~e"}, id="raw-backslash"),
        pytest.param(b"OK key=enc/a+b&x=100%25\r\n", {"key": "enc/a b", "x": "100%"}, id="plus-percent"),
    ],
)
def test_reply_values(line: bytes, expected: dict) -> None:
    assert parse_reply(line) == expected


def test_err_text_is_decoded() -> None:
    with pytest.raises(exceptions.UnregDomainError) as raised:
        parse_reply(b"ERR unreg_domain Domain+name+invalid/not+found\r\n")
    assert raised.value.text == "Domain name invalid/not found"
    assert isinstance(raised.value, exceptions.MogileFSError)


def test_unknown_error_code_is_a_plain_tracker_error() -> None:
    with pytest.raises(exceptions.TrackerError) as raised:
        parse_reply(b"ERR fid_in_use fid_in_use\r\n")
    assert type(raised.value) is exceptions.TrackerError and raised.value.code == "fid_in_use"


def test_invalid_key_is_an_unknown_key() -> None:
    with pytest.raises(exceptions.UnknownKeyError):
        parse_reply(b"ERR invalid_key invalid_key\r\n")


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"OK paths=1&path1=http://x", id="no-terminator"),
        pytest.param(b"HTTP/1.0 200 OK\r\n", id="not-a-reply"),
        pytest.param(b"\x16\x03\x01\r\n", id="garbage"),
        pytest.param(b"ERR \r\n", id="err-without-code"),
        pytest.param(b"\r\n", id="empty"),
    ],
)
def test_garbage_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(exceptions.ProtocolError):
        parse_reply(line)


@pytest.mark.parametrize(("line", "read"), [
    pytest.param(b"OK paths=2&path1=http://10.0.0.1:7500/dev1/0/000/000/0000000001.fid\r\n", paths_of,
                 id="a-path-missing"),
    pytest.param(b"OK paths=two\r\n", paths_of, id="a-count-not-a-number"),
    pytest.param(b"OK fid=1&key=a&length=5\r\n", file_info_of, id="no-class"),
])
def test_an_ok_reply_without_what_the_command_reads_is_a_protocol_error(line: bytes, read: Any) -> None:
    with pytest.raises(exceptions.ProtocolError, match="the tracker's reply has"):
        read(parse_reply(line))


# The key values of the encoding transcript (08-key-encoding.txt).
AWKWARD_KEYS = [
    "enc/a b", "enc/a&b", "enc/a=b", "enc/100%", "enc/a+b", "enc/café-日本", "enc/dir/sub/file.jpg",
    "enc/a,b:c\\d~e", "enc/\"<x>'", "tab\there", "x" * 255, "raw\udce9latin1",
]


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_request_keys_round_trip_through_the_trackers_decoder(key: str) -> None:
    line = encode_request("get_paths", {"domain": "testdom", "key": key, "noverify": 1})
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1 and b"\r" not in line[:-2]
    assert parse_request(line[:-2]) == ("get_paths", {"domain": "testdom", "key": key, "noverify": "1"})


def test_every_byte_of_a_value_crosses_the_line_as_itself() -> None:
    for byte in range(256):
        value = b"a" + bytes([byte]) + b"z"
        line = encode_request("get_paths", {"key": value, "noverify": True, "pathcount": -1})
        assert line.endswith(b"\r\n") and b"\r" not in line[:-2] and b"\n" not in line[:-2]
        assert b" " not in line.partition(b" ")[2] and line.count(b"&") == 2 and line.count(b"=") == 3
        assert parse_request(line[:-2]) == ("get_paths", {
            "key": value.decode("utf-8", "surrogateescape"), "noverify": "1", "pathcount": "-1"})


def test_request_encoding_matches_the_captured_client_lines() -> None:
    # A create_close line exactly as the capture client sent it (02-create-upload.txt).
    assert encode_request(
        "create_close",
        {"domain": "testdom", "key": "cap/avatar1", "fid": 1, "devid": 1,
         "path": "http://127.0.0.1:7500/dev1/0/000/000/0000000001.fid", "size": 24},
    ) == (b"create_close domain=testdom&key=cap%2Favatar1&fid=1&devid=1&path=http%3A%2F%2F127.0.0.1%3A7500"
          b"%2Fdev1%2F0%2F000%2F000%2F0000000001.fid&size=24\r\n")
    assert encode_request("noop") == b"noop\r\n"
    assert encode_request("get_paths", {"key": "k", "zone": None}) == b"get_paths key=k\r\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(b"domain=testdom&key=enc/a=b", {"domain": "testdom", "key": "enc/a"}, id="raw-equals-cuts"),
        pytest.param(b"key=enc/a&b&noverify=1", {"key": "enc/a", "b": "", "noverify": "1"}, id="raw-amp-splits"),
        pytest.param(b"key=enc/100%", {"key": "enc/100%"}, id="lone-percent"),
        pytest.param(b"key=a%+1b%1+c%-1", {"key": "a% 1b%1 c%-1"}, id="percent-with-no-two-hex-digits"),
        pytest.param(b"key=enc/caf%c3%a9", {"key": "enc/café"}, id="lower-hex"),
        pytest.param(b"key=enc/caf\xc3\xa9", {"key": "enc/café"}, id="raw-utf8"),
        pytest.param(b"key=enc/caf\xe9", {"key": "enc/caf\udce9"}, id="raw-latin1-is-another-key"),
        pytest.param(b"key=a%0D%0Anoop", {"key": "a\r\nnoop"}, id="encoded-crlf-stays-in-key"),
        pytest.param(b"&&key=x&", {"key": "x"}, id="empty-pairs"),
        pytest.param(b"domain=testdom key=x", {"domain": "testdom key"}, id="space-not-separator"),
        # mogilefsd 2.73 echoes a noop's repeated callid so: 'a\0' + '1', '0' + '1', '' + '1'.
        pytest.param(b"callid=a&callid=1", {"callid": "a\x001"}, id="repeated-name-joined-with-nul"),
        pytest.param(b"callid=0&callid=1", {"callid": "01"}, id="repeated-after-a-0-joined-as-is"),
        pytest.param(b"callid=&callid=1", {"callid": "1"}, id="repeated-after-empty"),
    ],
)
def test_request_args_decode_as_mogilefsd_does(args: bytes, expected: dict) -> None:
    assert decode_args(args) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(b"NOOP", ("noop", {}), id="upper-case"),
        pytest.param(b"   noop   ", ("noop", {}), id="blanks"),
        pytest.param(b"\tnoop", ("noop", {}), id="tab"),
        pytest.param(b"\x16\x03\x01\x00\x05hello", None, id="garbage"),
        pytest.param(b"noop foo=bar&callid=42", ("noop", {"foo": "bar", "callid": "42"}), id="args"),
    ],
)
def test_request_line_parsing(line: bytes, expected: object) -> None:
    assert parse_request(line) == expected


def test_a_dash_ends_the_command_word() -> None:
    # mogilefsd matches the command as \w+: "get-paths" is the unknown command "get".
    parsed = parse_request(b"get-paths domain=x")
    assert parsed is not None and parsed[0] == "get"


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("a\ud800b", "not UTF-8 text", id="lone-surrogate"),
    ],
)
def test_keys_no_tracker_holds_are_refused(key: str, problem: str) -> None:
    for check in (check_any_key, check_key):
        with pytest.raises(exceptions.BadKeyError, match=problem):
            check(key)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        pytest.param("k" * 256, "256 bytes long, over the 255", id="256-bytes"),
        pytest.param("é" * 128, "256 bytes long, over the 255", id="256-utf8-bytes"),
        pytest.param("a\x00b", "control byte NUL", id="nul"),
        pytest.param("a\rb", "control byte CR", id="cr"),
        pytest.param("a\nb", "control byte LF", id="lf"),
    ],
)
def test_keys_another_client_may_have_stored_are_asked_about_but_not_created(key: str, problem: str) -> None:
    assert check_any_key(key) == key.encode()
    with pytest.raises(exceptions.BadKeyError, match=problem):
        check_key(key)


def test_a_255_byte_key_is_accepted() -> None:
    assert len(check_key("k" * 255)) == 255
