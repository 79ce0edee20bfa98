"""The HTTP decisions of a file answer, free of WSGI and ASGI (RFC 9110).

Which answer a request gets (304, 412, 416, 206, 200 or an error), the headers each answer
carries, and the error answers themselves: built here once, so that every middleware sends the
same bytes and no error answer ever carries a file's headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

Headers = list[tuple[str, str]]

#: RFC 9110's reason phrases where older Pythons' ``HTTPStatus`` still has RFC 7231's.
_PHRASES = {416: "Range Not Satisfiable"}

#: The longest entity-tag list read, in characters: a longer one names no version. Clients send
#: a few tags; a server may take headers of megabytes (uvicorn's httptools), and reading each tag
#: of such a list took a worker's event loop 0.1 s of Python per request, or seconds.
MAX_ENTITY_TAG_LIST = 16384
#: The longest ``Range`` field read, in characters: a range takes 45 at most (19 digits a
#: position); a longer field, a list (which asks for the whole file anyway) or digits padded with
#: zeros by the megabyte, is not read, and the whole file is sent (RFC 9110 14.2 lets a server
#: ignore a range). Reading one of megabytes, as uvicorn's httptools passes on, took 50-75 ns a byte.
MAX_RANGE = 1024
_ENTITY_TAG = re.compile(r'(?:W/)?"([^"]*)"[ \t]*(?:,|$)')
#: Blanks and the commas of empty elements, which a list may have anywhere (RFC 9110 5.6.1.2).
_LIST_GAP = re.compile(r"[ \t,]*")
_BYTE_RANGE = re.compile(r"(\d*)-(\d*)")
#: The one spelling of a range a storage node reads (Perlbal 1.80's, which mogstored serves with).
_NODE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
#: Optional whitespace around a field's value (RFC 9110 5.6.3): spaces and tabs, not the other
#: blanks ``str.strip`` takes (latin-1's no-break space and NEL are a client's obs-text).
_OWS = " \t"
#: Digits enough for any file's length (below 2**63): a longer position is past every end.
_POSITION_DIGITS = 19


@dataclass(frozen=True)
class Answer:
    """A complete HTTP answer: status line, headers and a body small enough to hold.

    ``reproxy`` names the proxy the answer sends to the replicas (``"perlbal"``, ``"nginx"``).
    """

    status: str
    headers: Headers
    body: bytes = b""
    reproxy: str | None = None


@dataclass(frozen=True)
class FileRequest:
    """What of a request decides a file answer: the method and the conditional headers."""

    method: str = "GET"
    if_match: str | None = None
    if_none_match: str | None = None
    range: str | None = None
    if_range: str | None = None


@dataclass(frozen=True)
class FilePlan:
    """An answer with the file's bytes: status, headers, and the part to fetch.

    ``length`` is the body's length; ``byte_range`` is the absolute, inclusive ``(first, last)``
    pair to ask a storage node for, or ``None`` for the whole file.
    """

    status: str
    headers: Headers
    length: int
    byte_range: tuple[int, int] | None = None


def error(code: int, reason: str = "", headers: Headers | None = None) -> Answer:
    """A short ``text/plain`` error answer with exactly one ``Content-Length``, stored by no cache."""
    status = f"{code} {_PHRASES.get(code) or HTTPStatus(code).phrase}"
    body = f"{status}\n{reason}\n".encode() if reason else f"{status}\n".encode()
    return Answer(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *(headers or []),
        ],
        body,
    )


NOT_FOUND = error(404)
FORBIDDEN = error(403)
METHOD_NOT_ALLOWED = error(405, headers=[("Allow", "GET, HEAD")])
BAD_GATEWAY = error(502, "No replica of this file answered.")


def service_unavailable(retry_after_seconds: int) -> Answer:
    """The 503 for "no tracker answered", telling clients when to try again."""
    return error(503, "No tracker answered.", [("Retry-After", str(retry_after_seconds))])


def etag_matches(header: str | None, etag: str, *, weak: bool) -> bool:
    """True if the entity-tag list of ``If-Match``/``If-None-Match``/``If-Range`` names ``etag``
    (``*`` names any); ``weak`` compares as ``If-None-Match`` does, ignoring ``W/``."""
    if header is None:
        return False
    header = header.strip(_OWS)
    if header == "*":
        return True
    if f'"{etag}"' not in header or _listed_length(header) > MAX_ENTITY_TAG_LIST:
        return False  # no tag is the etag (a quick look: a list may be megabytes long), or too long a list
    position = _LIST_GAP.match(header).end()  # type: ignore[union-attr] # it matches anything
    named = False
    while position < len(header):
        match = _ENTITY_TAG.match(header, position)
        if match is None:
            return False  # not a list of entity-tags: it names nothing, whichever of its tags come first
        named = named or (match.group(1) == etag and (weak or not match.group(0).startswith("W/")))
        position = _LIST_GAP.match(header, match.end()).end()  # type: ignore[union-attr]
    return named


def _listed_length(header: str) -> int:
    """The characters of an entity-tag list but its blanks (never in a tag): the same whether a
    server joined repeated lines with ``","`` (gunicorn) or ``", "`` (the ASGI middleware)."""
    return len(header) - header.count(" ") - header.count("\t")


def if_range_holds(header: str | None, etag: str) -> bool:
    """True without ``If-Range``, or when it is the strong entity-tag ``etag`` itself: a list, ``*``,
    a weak tag or a date (files have no ``Last-Modified``) hold for no version (RFC 9110 13.1.5)."""
    return header is None or header.strip(_OWS) == f'"{etag}"'


def storage_node_range(header: str | None, size: int) -> tuple[int, int, int]:
    """``(status, first, last)`` for ``Range: header`` of a file of ``size`` bytes, as a storage
    node decides it: Perlbal 1.80, which mogstored serves with. Only one ``bytes=a-b`` spelled
    so counts (anything else is a 200 with all of it), and a suffix range ``bytes=-N`` is the
    first N+1 bytes, not the last N: what a proxy sent to the node gets."""
    match = _NODE_RANGE.match(header or "")
    if match is None or match.group(0) == "bytes=-":
        return 200, 0, size - 1
    first, last = (_position(digits) for digits in match.groups())
    if _reversed(*match.groups()) or first is None and last == 0:
        return 416, 0, 0
    if first is not None and size <= first:
        return 416, 0, 0
    return 206, first or 0, size - 1 if last is None or last >= size else last


def byte_range(header: str | None, length: int) -> tuple[int, int] | Literal[False] | None:
    """The one range ``header`` asks of ``length`` bytes as ``(first, last)``; ``None`` to send the
    whole file (no header, an invalid one, or several ranges, which RFC 9110 lets a server
    ignore, or one over :data:`MAX_RANGE` long); ``False`` when the range is unsatisfiable (416).
    Empty elements of the list are no ranges (RFC 9110 5.6.1.2): ``bytes=0-1,`` asks for one."""
    if header is None or len(header) > MAX_RANGE:
        return None
    unit, _, ranges = header.partition("=")
    listed = [element for element in ranges.split(",") if element.strip(_OWS)]
    if unit.strip(_OWS).lower() != "bytes" or len(listed) != 1:
        return None
    match = _BYTE_RANGE.fullmatch(listed[0].strip(_OWS))
    if match is None or match.groups() == ("", ""):
        return None
    first, last = (_position(digits) for digits in match.groups())
    if first is None:  # a suffix: the last N bytes, or all of a shorter file (none is no range)
        if not last:
            return False
        return (max(length - last, 0), length - 1) if length else None  # no 206 can hold 0 bytes
    if _reversed(*match.groups()):
        return None
    if first >= length:
        return False
    return first, length - 1 if last is None else min(last, length - 1)


def _position(digits: str) -> int | None:
    """The number ``digits`` of a byte range spell (``None`` for none), past every file's end when
    it has more digits than any length (where Python's ``int`` refuses thousands of them)."""
    if not digits:
        return None
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= _POSITION_DIGITS else 10 ** _POSITION_DIGITS


def _reversed(first: str, last: str) -> bool:
    """True if both positions are given and the last comes before the first, however many digits
    each has (past :data:`_POSITION_DIGITS`, :func:`_position` makes them alike)."""
    if not first or not last:
        return False
    first, last = first.lstrip("0"), last.lstrip("0")
    return (len(last), last) < (len(first), first)


def precondition_answer(if_match: str | None, if_none_match: str | None, etag: str,
                        headers: Headers) -> Answer | None:
    """The answer the preconditions decide for the version ``etag`` with the representation
    ``headers``, before any range: ``412`` when ``If-Match`` names none of its tags, ``304``
    when ``If-None-Match`` names one (RFC 9110 13.2.2); ``None`` when neither does."""
    if if_match is not None and not etag_matches(if_match, etag, weak=False):
        return error(412)
    if if_none_match is not None and etag_matches(if_none_match, etag, weak=True):
        return not_modified(headers)
    return None


def file_plan(request: FileRequest, etag: str, length: int, headers: Headers) -> Answer | FilePlan:
    """The answer to ``request`` for a file of ``length`` bytes with the strong ``etag`` (unquoted)
    and the representation ``headers`` (type, ETag, caching; not framing): a complete
    :class:`Answer` when the file is not needed (304, 412, 416), else a :class:`FilePlan` (also
    for HEAD, whose 200 promises that the file is there)."""
    decided = precondition_answer(request.if_match, request.if_none_match, etag, headers)
    if decided is not None:
        return decided
    requested = None
    if request.method != "HEAD" and if_range_holds(request.if_range, etag):
        requested = byte_range(request.range, length)
    if requested is False:
        etag_headers = [header for header in headers if header[0] == "ETag"]
        return error(416, "The range is outside the file.",
                     [("Content-Range", f"bytes */{length}"), ("Accept-Ranges", "bytes"), *etag_headers])
    if requested is None:
        plan = FilePlan("200 OK", [*headers, ("Accept-Ranges", "bytes"), ("Content-Length", str(length))], length)
    else:
        first, last = requested
        plan = FilePlan(
            "206 Partial Content",
            [*headers, ("Accept-Ranges", "bytes"), ("Content-Range", f"bytes {first}-{last}/{length}"),
             ("Content-Length", str(last - first + 1))],
            last - first + 1,
            requested,
        )
    return plan


def not_modified(headers: Headers) -> Answer:
    """The 304 for a file with the representation ``headers``: its validators and caching, no type."""
    return Answer("304 Not Modified", [header for header in headers if header[0] != "Content-Type"])
