"""The WSGI-free HTTP decisions: conditional requests, ranges and error answers (RFC 9110)."""

from __future__ import annotations

import pytest

from mogile_middleware import http
from mogile_middleware.http import Answer, FilePlan, FileRequest

ETAG = "fid-42"
HEADERS = [("Content-Type", "image/png"), ("ETag", f'"{ETAG}"'), ("Cache-Control", "public, max-age=60")]


def plan(length: int = 100, **request: str) -> Answer | FilePlan:
    return http.file_plan(FileRequest(**request), ETAG, length, HEADERS)


@pytest.mark.parametrize(("header", "weak", "expected"), [
    pytest.param('"fid-42"', False, True, id="strong"),
    pytest.param('W/"fid-42"', True, True, id="weak-compared-weakly"),
    pytest.param('W/"fid-42"', False, False, id="weak-compared-strongly"),
    pytest.param('"a", "fid-42"', False, True, id="list"),
    pytest.param("*", False, True, id="star"),
    pytest.param('"fid-4"', True, False, id="other"),
    pytest.param("fid-42", True, False, id="unquoted"),
    pytest.param('"fid-42" garbage', True, False, id="garbage-after"),
    # A list that is not one names nothing, whatever it names before its fault (RFC 9110 13.1.1-2:
    # "*" or tags, not both), so the answer does not hang on the order of its elements.
    pytest.param('"fid-42", *', True, False, id="tag-then-star"),
    pytest.param('*, "fid-42"', True, False, id="star-then-tag"),
    pytest.param('"fid-42", garbage', False, False, id="garbage-element-after"),
    pytest.param("", True, False, id="empty"),
    # Empty elements are ignored wherever they are (RFC 9110 5.6.1.2).
    pytest.param('"a", , "fid-42"', False, True, id="empty-element"),
    pytest.param(', "fid-42",', True, True, id="empty-first-and-last"),
    pytest.param(" , ,", True, False, id="only-empty-elements"),
    pytest.param(' \t"fid-42"\t ', False, True, id="blanks-around"),
    # Optional whitespace is spaces and tabs (RFC 9110 5.6.3): a no-break space or a NEL
    # (latin-1's 0xA0 and 0x85) is a client's obs-text, part of the value.
    pytest.param('"fid-42"\xa0', True, False, id="no-break-space-after"),
    pytest.param('\x85"fid-42"', True, False, id="nel-before"),
])
def test_etag_matching(header: str, weak: bool, expected: bool) -> None:
    assert http.etag_matches(header, ETAG, weak=weak) is expected


def test_an_entity_tag_list_longer_than_any_client_sends_names_no_version() -> None:
    """Each tag of a megabyte list (uvicorn takes such a header) was read in Python, three times
    a request: a tenth of a second of a worker's event loop, seconds for a larger one."""
    others = ", ".join(f'"fid-{number}"' for number in range(100, 1500))
    assert len(others) < http.MAX_ENTITY_TAG_LIST
    assert http.etag_matches(f'{others}, "{ETAG}"', ETAG, weak=False)
    too_long = ", ".join(f'"fid-{number}"' for number in range(100, 200_000))
    assert not http.etag_matches(f'{too_long}, "{ETAG}"', ETAG, weak=False)
    assert plan(if_none_match=f'{too_long}, "{ETAG}"').status == "200 OK"  # the file, not a 304
    assert plan(if_match=f'"{ETAG}", {too_long}').status.startswith("412")


@pytest.mark.parametrize("spare", [-1, 0, 1])
def test_repeated_lines_are_read_alike_at_the_limit_however_a_server_joins_them(spare: int) -> None:
    """gunicorn joins repeated lines with ",", the ASGI middleware with ", ": three lines of 16,382
    characters were a 304 under one and a 200 under the other."""
    lines = ['"' + "a" * 5400 + '"', '"' + "b" * 5400 + '"', f'"", "{ETAG}"']
    lines[2] = f'"{"c" * (http.MAX_ENTITY_TAG_LIST + spare - len(",".join(lines)) + 1)}", "{ETAG}"'  # its blank aside
    answers = {http.etag_matches(separator.join(lines), ETAG, weak=True) for separator in (",", ", ")}
    assert answers == {spare <= 0}


@pytest.mark.parametrize(("header", "length", "expected"), [
    pytest.param(None, 100, None, id="none"),
    pytest.param("bytes=0-9", 100, (0, 9), id="first-ten"),
    pytest.param("bytes=90-", 100, (90, 99), id="open"),
    pytest.param("bytes=-10", 100, (90, 99), id="suffix"),
    pytest.param("bytes=-1000", 100, (0, 99), id="suffix-longer-than-file"),
    pytest.param("bytes=50-1000", 100, (50, 99), id="last-clamped"),
    pytest.param("bytes=-0", 100, False, id="empty-suffix"),
    pytest.param("bytes=100-", 100, False, id="past-the-end"),
    pytest.param("bytes=0-0", 0, False, id="empty-file"),
    # A non-zero suffix is satisfiable (RFC 9110 14.1.1): all of an empty file, which no 206 can hold.
    pytest.param("bytes=-5", 0, None, id="suffix-of-empty-file"),
    pytest.param("bytes=-0", 0, False, id="empty-suffix-of-empty-file"),
    # Positions of more digits than any length are past every end.
    pytest.param("bytes=" + "9" * 500 + "-", 100, False, id="huge-first"),
    pytest.param("bytes=0-" + "9" * 500, 100, (0, 99), id="huge-last"),
    pytest.param("bytes=-" + "9" * 500, 100, (0, 99), id="huge-suffix"),
    pytest.param("bytes=" + "0" * 500 + "7-8", 100, (7, 8), id="leading-zeros"),
    # A field longer than MAX_RANGE is not read (of megabytes, reading it took a worker seconds).
    pytest.param("bytes=" + "0" * (http.MAX_RANGE - 9) + "7-8", 100, (7, 8), id="longest-read"),
    pytest.param("bytes=" + "0" * (http.MAX_RANGE - 8) + "7-8", 100, None, id="too-long-ignored"),
    pytest.param("bytes=0-1,5-6", 100, None, id="several-ignored"),
    # Empty list elements are none (RFC 9110 5.6.1.2): one range, as a client's list builder may end it.
    pytest.param("bytes=0-1,", 100, (0, 1), id="trailing-comma"),
    pytest.param("bytes= , 90-\t,", 100, (90, 99), id="empty-elements"),
    pytest.param("bytes=,", 100, None, id="only-empty-elements"),
    pytest.param("bytes=0-1, ,5-6", 100, None, id="several-among-empty"),
    pytest.param("bytes=5-1", 100, None, id="reversed-ignored"),
    pytest.param("bytes=99999999999999999999-19999999999999999999", 100, None, id="huge-reversed-ignored"),
    pytest.param("bytes=" + "2" * 500 + "-0" + "1" * 500, 100, None, id="huger-reversed-ignored"),
    pytest.param("bytes=0-1\t", 100, (0, 1), id="tab-after"),
    pytest.param("bytes=0-1\xa0", 100, None, id="no-break-space-after"),
    pytest.param("\xa0bytes=0-1", 100, None, id="no-break-space-before"),
    pytest.param("\x85bytes=0-1", 100, None, id="nel-before"),
    pytest.param("bytes=-", 100, None, id="no-numbers"),
    pytest.param("items=0-1", 100, None, id="other-unit"),
    pytest.param("bytes=a-b", 100, None, id="not-numbers"),
])
def test_byte_range(header: str | None, length: int, expected: object) -> None:
    assert http.byte_range(header, length) == expected


@pytest.mark.parametrize(("header", "expected"), [
    pytest.param("bytes=0-9", (206, 0, 9), id="first-ten"),
    pytest.param("bytes=90-", (206, 90, 99), id="open"),
    pytest.param("bytes=50-1000", (206, 50, 99), id="last-clamped"),
    pytest.param("bytes=-10", (206, 0, 10), id="suffix-as-the-first-bytes"),
    pytest.param("bytes=-0", (416, 0, 0), id="empty-suffix"),
    pytest.param("bytes=5-1", (416, 0, 0), id="reversed"),
    pytest.param("bytes=100-", (416, 0, 0), id="past-the-end"),
    pytest.param("bytes=" + "9" * 5000 + "-", (416, 0, 0), id="huge-first"),
    pytest.param("bytes=00099999999999999999999-19999999999999999999", (416, 0, 0), id="huge-reversed"),
    pytest.param("bytes=0-" + "9" * 5000, (206, 0, 99), id="huge-last"),
    pytest.param("bytes=-", (200, 0, 99), id="no-numbers"),
    pytest.param("BYTES=0-9", (200, 0, 99), id="unit-in-capitals"),
    pytest.param("bytes= 0-9", (200, 0, 99), id="blank"),
    pytest.param("bytes=0-1,5-6", (200, 0, 99), id="several"),
    pytest.param(None, (200, 0, 99), id="none"),
])
def test_storage_node_range_reads_as_perlbal_does(header: str | None, expected: tuple[int, int, int]) -> None:
    """Perlbal 1.80's ``Perlbal::HTTPHeaders::range``, which mogstored answers with."""
    assert http.storage_node_range(header, 100) == expected


def test_whole_file() -> None:
    answer = plan()
    assert isinstance(answer, FilePlan) and answer.byte_range is None
    assert answer.status == "200 OK"
    assert dict(answer.headers)["Content-Length"] == "100"
    assert dict(answer.headers)["Accept-Ranges"] == "bytes"


def test_a_range_is_fetched_as_an_absolute_range() -> None:
    answer = plan(range="bytes=-10")
    assert isinstance(answer, FilePlan)
    assert (answer.status, answer.byte_range) == ("206 Partial Content", (90, 99))
    assert dict(answer.headers)["Content-Range"] == "bytes 90-99/100"
    assert dict(answer.headers)["Content-Length"] == "10"


def test_head_ignores_the_range_and_keeps_the_length() -> None:
    answer = plan(method="HEAD", range="bytes=0-9")
    assert isinstance(answer, FilePlan) and answer.byte_range is None
    assert (answer.status, dict(answer.headers)["Content-Length"]) == ("200 OK", "100")


@pytest.mark.parametrize("if_none_match", ['"fid-42"', 'W/"fid-42"', '"x", "fid-42"', "*"])
def test_not_modified_keeps_validators_and_caching_but_not_the_type(if_none_match: str) -> None:
    answer = plan(if_none_match=if_none_match, range="bytes=0-1")
    assert isinstance(answer, Answer) and answer.status == "304 Not Modified" and answer.body == b""
    assert dict(answer.headers) == {"ETag": '"fid-42"', "Cache-Control": "public, max-age=60"}


def test_if_match_of_another_version_is_412_without_file_headers() -> None:
    answer = plan(if_match='"fid-41"')
    assert isinstance(answer, Answer) and answer.status.startswith("412")
    assert "ETag" not in dict(answer.headers) and "public" not in str(answer.headers)
    assert isinstance(plan(if_match='"fid-42"'), FilePlan)


def test_unsatisfiable_range_is_416_with_the_length_and_no_cache_control() -> None:
    answer = plan(range="bytes=-0")
    assert isinstance(answer, Answer) and answer.status == "416 Range Not Satisfiable"
    headers = dict(answer.headers)
    assert headers["Content-Range"] == "bytes */100"
    assert headers["ETag"] == '"fid-42"' and headers["Cache-Control"] == "no-store"
    assert headers["Content-Length"] == str(len(answer.body))


@pytest.mark.parametrize(("if_range", "ranged"), [
    pytest.param('"fid-42"', True, id="same-version"),
    pytest.param('"fid-41"', False, id="other-version"),
    pytest.param('W/"fid-42"', False, id="weak-never-matches"),
    pytest.param("Tue, 01 Dec 2026 10:00:00 GMT", False, id="date-without-last-modified"),
    # One validator (RFC 9110 13.1.5): a list or "*" is none, whatever it names.
    pytest.param("*", False, id="star"),
    pytest.param('"fid-41", "fid-42"', False, id="list"),
    pytest.param(' "fid-42" ', True, id="blanks-around"),
    pytest.param('"fid-42"\xa0', False, id="no-break-space-is-not-a-blank"),
])
def test_if_range(if_range: str, ranged: bool) -> None:
    answer = plan(range="bytes=0-9", if_range=if_range)
    assert isinstance(answer, FilePlan) and (answer.byte_range is not None) is ranged


@pytest.mark.parametrize("answer", [
    http.NOT_FOUND, http.METHOD_NOT_ALLOWED, http.BAD_GATEWAY, http.service_unavailable(7), http.error(400, "bad"),
    http.error(416, "x", [("Content-Range", "bytes */3")]),
])
def test_error_answers_frame_themselves_once_and_are_never_stored(answer: Answer) -> None:
    names = [name.lower() for name, _ in answer.headers]
    assert names.count("content-length") == 1 and names.count("content-type") == 1
    assert dict(answer.headers)["Content-Length"] == str(len(answer.body))
    assert dict(answer.headers)["Cache-Control"] == "no-store"
    assert answer.body.decode().startswith(answer.status.split()[0])
