"""The MogileFS tracker line protocol, without I/O.

A request is one line, ``<command> <name>=<value>&<name>=<value>\\r\\n``, every name and value
URL-encoded (so ``&``, ``=``, ``%``, ``+``, spaces, ``/``, non-ASCII and control bytes never break
the line). A reply is one line, ``OK <args>`` or ``ERR <code> <text>``, with values encoded the
way mogilefsd's ``eurl`` does it. Keys are byte strings to the tracker; here they are ``str``
decoded from UTF-8 with ``surrogateescape``, so that any stored byte string round-trips.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

from .exceptions import BadKeyError, ProtocolError, tracker_error

#: The longest key mogilefsd's schema holds (``dkey VARCHAR(255)``).
MAX_KEY_BYTES = 255

ArgValue = str | bytes | int | None

_FORBIDDEN_KEY_BYTES = {b"\x00": "NUL", b"\r": "CR", b"\n": "LF"}
#: What no key served on the web may hold: the middleware answers 400 to a path with any of them.
CONTROL_CHARACTERS = frozenset(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)])
#: A number in a tracker's reply: ASCII digits (``str.isdigit`` takes ``²`` too, which ``int``
#: refuses), 20 at most (a 64-bit one), so that a garbled reply is a ProtocolError, never a
#: ValueError or a long ``int()``.
_WHOLE_NUMBER = re.compile(r"[0-9]{1,20}")
#: The end of a replica URL shaped like mogstored's, which names its fid (``.../0000000123.fid``).
_FID_PATH = re.compile(r"/0*([0-9]{1,20})\.fid$")


def fid_of(url: str) -> int | None:
    """The fid a replica URL names by its path (mogstored's shape: ``.../0000000123.fid``), else
    None: not by a query or fragment, which name nothing a storage node reads."""
    match = _FID_PATH.search(url.partition("#")[0].partition("?")[0])
    return int(match.group(1)) if match else None


def names_a_fid(paths: Sequence[str]) -> bool:
    """True if replica URLs name their fid (mogstored's shape): every replica, now or later, holds
    the same bytes. URLs that name the key alone may serve another version by the next request."""
    return bool(paths) and fid_of(paths[0]) is not None


def to_bytes(text: str | bytes) -> bytes:
    """UTF-8 bytes of ``text``, keeping the raw bytes of surrogate-escaped characters."""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def to_text(data: bytes) -> str:
    """``data`` decoded from UTF-8, undecodable bytes kept as surrogate escapes."""
    return data.decode("utf-8", "surrogateescape")


def key_bytes(text: str | bytes, what: str = "key") -> bytes:
    """The bytes of a key or of the start of keys (``what``); :class:`BadKeyError` for text UTF-8
    cannot hold (a lone surrogate, which no file name or URL decodes to), a TypeError for neither
    text nor bytes."""
    if not isinstance(text, (str, bytes)):
        raise TypeError(f"{what} must be a str or bytes, not {type(text).__name__}")
    try:
        return to_bytes(text)
    except UnicodeEncodeError as error:
        raise BadKeyError(f"{what} holds {error.object[error.start]!r}, which is not UTF-8 text") from None


#: A key as the clients take it: text, or its bytes.
Key = str | bytes


def as_text(key: Key) -> str:
    """``key`` as text, its bytes that are not UTF-8 as surrogate escapes (as ``list_keys`` gives
    such keys back): what the clients pass on of a key given as bytes. Anything else is left as
    it is, for the checks to refuse."""
    return to_text(key) if isinstance(key, bytes) else key


def check_any_key(key: Key) -> bytes:
    """Return the bytes of a key to ask about, or raise :class:`BadKeyError` if no tracker holds
    it (empty, or text UTF-8 cannot encode); a TypeError if it is not text or bytes at all. Any
    other key may be another client's: on SQLite, mogilefsd 2.73 stores keys over 255 bytes and
    keys with line breaks, which the protocol's encoding carries."""
    if not isinstance(key, (str, bytes)):
        raise TypeError(f"a key is a str or bytes, not {type(key).__name__}")
    raw = key_bytes(key)
    if not raw:
        raise BadKeyError("empty key")
    return raw


def check_key(key: str | bytes, *, length: bool = True) -> bytes:
    """Return the bytes of a key to create, or raise as :func:`check_any_key` does, and
    :class:`BadKeyError` for one over 255 bytes (MySQL's ``dkey VARCHAR(255)`` cuts it short or
    refuses it; not with ``length`` false) or with NUL, CR or LF (no URL serves it, and line-based
    tools, ``moglistkeys`` among them, would split it)."""
    raw = check_any_key(key)
    if length and len(raw) > MAX_KEY_BYTES:
        raise BadKeyError(f"key is {len(raw)} bytes long, over the {MAX_KEY_BYTES} of MogileFS's schema")
    for forbidden, name in _FORBIDDEN_KEY_BYTES.items():
        if forbidden in raw:  # named, not as a repr: a line of the CLI escapes its backslash again
            raise BadKeyError(f"key contains the control byte {name}")
    return raw


def check_url_key(key: str | bytes) -> str:
    """Return the key as the text a URL names it by, or raise as :func:`check_key` does, and
    :class:`BadKeyError` for a key of bytes that are not UTF-8: no URL names it, since the
    middleware answers a path that is not UTF-8 with a 400."""
    raw = check_key(key)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadKeyError(f"key {to_text(raw)!r} is not UTF-8: no URL names it") from None


def has_control_character(text: str) -> bool:
    """True if ``text`` holds a control character (C0, DEL, C1): the middleware answers a path
    with one with a 400."""
    return not text.isprintable() and not CONTROL_CHARACTERS.isdisjoint(text)  # printable: none (fast)


def check_linked_path(path: str) -> str:
    """Return a URL path's text (a key, or what ``key_for_path`` maps to one), or raise
    :class:`BadKeyError` if a segment is ``.`` or ``..``: clients remove those from a URL (RFC 3986,
    5.2.4), so a link to it would name another key; or if it holds a control character, since
    the middleware answers such a path with a 400."""
    if has_control_character(path):
        control = next(character for character in path if character in CONTROL_CHARACTERS)
        raise BadKeyError(f"{path!r} holds the control character {control!r}, which the middleware answers "
                          f"with a 400: no link serves it")
    if "." in path:
        for segment in path.split("/"):
            if segment in (".", ".."):
                raise BadKeyError(f"{path!r} has a {segment!r} segment, which clients remove from a URL: "
                                  f"its link would name another key")
    return path


def local_link(path: str) -> str:
    """A percent-encoded URL path with a leading ``//`` written ``/%2F``: a browser reads
    ``//name/...`` as a link to the host ``name`` (a key ``/name/...`` under the prefix ``/``).
    Servers decode both to the same path."""
    return "/%2F" + path[2:] if path.startswith("//") else path


def encode_request(command: str, args: Mapping[str, ArgValue] | None = None) -> bytes:
    """The request line for ``command`` with ``args`` (``None`` values are left out)."""
    pairs = [f"{_escaped_name(name)}={_escaped_value(value)}" for name, value in (args or {}).items()
             if value is not None]
    line = f"{command} {'&'.join(pairs)}" if pairs else command
    return line.encode("ascii") + b"\r\n"


#: What a request argument may hold unescaped (the bytes ``quote_plus`` never changes).
_UNESCAPED_TEXT = re.compile(r"[A-Za-z0-9_.~-]*")
#: A byte escaped as mogilefsd reads one (``decode_url_args``): ``int()`` alone also takes ``%+1``.
_ESCAPED_BYTE = re.compile(rb"%([0-9A-Fa-f]{2})")
#: The byte of each two hex digits, in either case.
_HEX_BYTES = {bytes([high, low]): bytes([int(bytes([high, low]), 16)])
              for high in b"0123456789abcdefABCDEF" for low in b"0123456789abcdefABCDEF"}
#: ``quote_plus`` as a table over bytes read as latin-1: one ``str.translate`` escapes a value.
_ESCAPES = {byte: "+" if byte == 0x20 else f"%{byte:02X}" for byte in range(256)
            if not _UNESCAPED_TEXT.fullmatch(chr(byte))}


def _escaped(data: bytes) -> str:
    """``data`` URL-escaped as mogilefsd unescapes it, as ``quote_plus`` does it."""
    return data.decode("latin-1").translate(_ESCAPES)


@functools.lru_cache(maxsize=64)
def _escaped_name(name: str) -> str:
    """An argument's name, escaped (the few names of the protocol, each escaped once)."""
    return _escaped(name.encode("utf-8"))


def _escaped_value(value: str | bytes | int) -> str:
    """An argument's value, escaped: text that needs nothing done is used as it is."""
    if isinstance(value, str):
        return value if _UNESCAPED_TEXT.fullmatch(value) else _escaped(to_bytes(value))
    if isinstance(value, int):  # digits and a minus sign need nothing done (a bool is 1 or 0)
        return str(int(value))
    return _escaped(value)


def _arg_bytes(value: str | bytes | int) -> bytes:
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, int):
        return str(value).encode("ascii")
    return to_bytes(value)


def _unescape(data: bytes) -> bytes:
    """mogilefsd's unescaping: ``+`` is a space, then ``%`` and two hex digits (either case) a
    byte; any other ``%`` stays."""
    return _ESCAPED_BYTE.sub(lambda escape: _HEX_BYTES[escape[1]], data.replace(b"+", b" "))


def decode_args(data: bytes) -> dict[str, str]:
    """Decode ``k=v&k=v`` as mogilefsd does.

    Empty pairs are skipped, a raw ``=`` inside a value cuts the value, a repeated name joins its
    values with NUL, or without when the value so far is false to Perl (``""`` or ``"0"``).
    """
    args: dict[str, str] = {}
    for pair in data.split(b"&"):
        if not pair or pair == b"0":
            continue
        fields = pair.split(b"=")
        name = to_text(_unescape(fields[0]))
        value = to_text(_unescape(fields[1])) if len(fields) > 1 else ""
        so_far = args.get(name, "")
        args[name] = f"{so_far}\x00{value}" if so_far not in ("", "0") else so_far + value
    return args


_EURL_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_,-./\\:")
_EURL_TABLE = tuple(
    chr(byte) if byte in _EURL_SAFE else "+" if byte == 0x20 else f"%{byte:02X}" for byte in range(256)
)


def eurl(value: str | bytes | int) -> str:
    """Encode a reply value as mogilefsd does: a few characters raw, space as ``+``, ``%XX`` else."""
    return "".join(_EURL_TABLE[byte] for byte in _arg_bytes(value))


def format_ok(args: Mapping[str, str | bytes | int] | None = None) -> bytes:
    """An ``OK`` reply line (``OK \\r\\n`` when there is nothing to say)."""
    body = "&".join(f"{eurl(name)}={eurl(value)}" for name, value in (args or {}).items())
    return f"OK {body}\r\n".encode("ascii")


def format_err(code: str, text: str | None = None, callid: str | None = None) -> bytes:
    """An ``ERR <code> <text>`` reply line; the text defaults to the code, as mogilefsd does."""
    tail = f" {eurl(callid)}" if callid is not None else ""
    return f"ERR {code} {eurl(text or code)}{tail}\r\n".encode("ascii")


_REQUEST_LINE = re.compile(rb"\s*(\w+)\s*(.*)", re.DOTALL)


def parse_request(line: bytes) -> tuple[str, dict[str, str]] | None:
    """The lower-cased command and decoded arguments of a request line (without its line end).

    ``None`` when the line does not start with a command word; mogilefsd answers that with
    ``ERR unknown_command``.
    """
    match = _REQUEST_LINE.match(line)
    if match is None:
        return None
    return match.group(1).decode("ascii").lower(), decode_args(match.group(2))


class Reply(dict[str, str]):
    """The arguments of an ``OK`` reply: a missing or malformed one is a :class:`ProtocolError`."""

    def __missing__(self, name: str) -> str:
        raise ProtocolError(f"the tracker's reply has no {name!r}")

    def number(self, name: str) -> int:
        """The argument ``name`` as a whole number."""
        value = whole_number(self[name])
        if value is None:
            raise ProtocolError(f"the tracker's reply has {name}={self[name][:80]!r}, not a number")
        return value


def whole_number(text: str) -> int | None:
    """``text`` as a number of a tracker's reply (up to 20 ASCII digits); ``None`` for anything else."""
    return int(text) if _WHOLE_NUMBER.fullmatch(text) else None


def parse_reply(line: bytes) -> Reply:
    """The arguments of an ``OK`` line; raise the matching :class:`TrackerError` for ``ERR``.

    Anything else is a :class:`ProtocolError`.
    """
    if not line.endswith(b"\n"):
        raise ProtocolError(f"reply line not terminated: {line[:80]!r}")
    body = line.rstrip(b"\r\n")
    if body == b"OK" or body.startswith(b"OK "):
        return Reply(decode_args(body[3:]))
    if body.startswith(b"ERR "):
        fields = body[4:].split(b" ")
        code = to_text(fields[0])
        if not code:
            raise ProtocolError(f"ERR reply without a code: {line[:80]!r}")
        text = to_text(_unescape(fields[1])) if len(fields) > 1 else code
        raise tracker_error(code, text)
    raise ProtocolError(f"not a tracker reply: {line[:80]!r}")


def _mindevcount(reply: Reply, name: str) -> int:
    """A class's ``mindevcount`` in a ``get_domains`` reply. mogilefsd stores what ``create_class``
    was given as a number: ``1.5`` (kept as such: a class wants replicas until it has at least
    that many) or ``1e+30``. One such class, made by any client, must not make the whole listing
    unreadable."""
    if (count := whole_number(reply[name])) is not None:
        return count
    try:
        number = float(reply[name])
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ProtocolError(f"the tracker's reply has {name}={reply[name][:80]!r}, not a number")
    return math.ceil(number)


def parse_domains(reply: Reply) -> dict[str, dict[str, tuple[int, str]]]:
    """A ``get_domains`` reply as ``{domain: {class: (mindevcount, hashtype)}}``."""
    domains: dict[str, dict[str, tuple[int, str]]] = {}
    for d in range(1, reply.number("domains") + 1):
        prefix = f"domain{d}"
        domains[reply[prefix]] = {
            reply[f"{prefix}class{c}name"]: (
                _mindevcount(reply, f"{prefix}class{c}mindevcount"),
                reply.get(f"{prefix}class{c}hashtype") or "NONE",
            )
            for c in range(1, reply.number(f"{prefix}classes") + 1)
        }
    return domains
