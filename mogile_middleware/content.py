"""What a browser does with a stored file: its type, its charset, and whether it may run script.

The type comes from the extension of the key's last segment through a fixed table (Python's own
``mimetypes`` data, a few web types it lacks or spells differently by version, and the site's
additions), never from anything else in the key. Users' files are kept from running script on
the site's origin: HTML, SVG and XML answers carry ``Content-Security-Policy: sandbox``, and
JavaScript and CSS are sent as text, so a ``<script src>`` or a stylesheet link pointing at an
upload cannot use it. A site whose MogileFS holds only its own assets turns that off with
``trusted_files``.
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from collections.abc import Mapping, Sequence
from urllib.parse import quote

Headers = list[tuple[str, str]]

#: Web types Python's table lacks, and compressed files as the bytes they are (no tar type
#: without a Content-Encoding, which a browser would undo).
_MORE_TYPES = {
    ".atom": "application/atom+xml", ".br": "application/x-brotli", ".bz2": "application/x-bzip2",
    ".gz": "application/gzip", ".ics": "text/calendar", ".jsonld": "application/ld+json",
    ".map": "application/json", ".md": "text/markdown", ".mjs": "text/javascript", ".rss": "application/rss+xml",
    ".svgz": "application/gzip", ".taz": "application/gzip", ".tbz2": "application/x-bzip2",
    ".tgz": "application/gzip", ".txz": "application/x-xz", ".tz": "application/gzip", ".webmanifest":
    "application/manifest+json", ".webp": "image/webp", ".woff": "font/woff", ".woff2": "font/woff2",
    ".xhtml": "application/xhtml+xml", ".xz": "application/x-xz", ".Z": "application/x-compress",
    ".zst": "application/zstd",
}
#: The types Pythons from 3.10 on disagree on, as one of them has each (JavaScript as RFC 9239
#: and 3.12 spell it, ``.cjs`` too, which 3.14 calls ``application/node``; those 3.14 adds, the
#: audio and video types among them, as it spells them; those it renames as 3.10 to 3.13 spell
#: them), so that hosts running different Pythons send a file with the same type.
_AGREED_TYPES = {
    ".7z": "application/x-7z-compressed", ".apk": "application/vnd.android.package-archive",
    ".avi": "video/x-msvideo", ".avif": "image/avif", ".bmp": "image/bmp", ".cjs": "text/javascript",
    ".deb": "application/x-debian-package",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".emf": "image/emf", ".eot": "application/vnd.ms-fontobject", ".epub": "application/epub+zip",
    ".fits": "image/fits", ".flac": "audio/flac", ".g3": "image/g3fax", ".glb": "model/gltf-binary",
    ".gltf": "model/gltf+json", ".jp2": "image/jp2", ".jpm": "image/jpm", ".jpx": "image/jpx",
    ".js": "text/javascript", ".m4a": "audio/mp4", ".m4v": "video/x-m4v", ".markdown": "text/markdown",
    ".mk3d": "video/matroska-3d", ".mka": "audio/matroska", ".mkv": "video/matroska", ".n3": "text/n3",
    ".nq": "application/n-quads", ".nt": "application/n-triples",
    ".odg": "application/vnd.oasis.opendocument.graphics", ".odp": "application/vnd.oasis.opendocument.presentation",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet", ".odt": "application/vnd.oasis.opendocument.text",
    ".ogg": "audio/ogg", ".ogv": "video/ogg", ".ogx": "application/ogg", ".otf": "font/otf",
    ".php": "application/x-httpd-php",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".rar": "application/vnd.rar", ".rpm": "application/x-rpm", ".rst": "text/x-rst", ".rtf": "application/rtf",
    ".srt": "text/plain", ".stl": "model/stl", ".t38": "image/t38", ".texi": "application/x-texinfo",
    ".texinfo": "application/x-texinfo", ".tfx": "image/tiff-fx", ".toml": "application/toml",
    ".trig": "application/trig", ".ttf": "font/ttf", ".vtt": "text/vtt", ".wav": "audio/x-wav",
    ".weba": "audio/webm", ".wmf": "image/wmf", ".wmv": "video/x-ms-wmv",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", ".yaml": "application/yaml",
    ".yml": "application/yaml",
}

#: Types a browser runs script in when it opens them as a page.
_DOCUMENT_TYPES = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml",
                             "text/xsl"})
#: Types a browser runs as a script from ``<script src>``, whatever ``nosniff`` says: every
#: "JavaScript MIME type essence" of the WHATWG MIME Sniffing standard (a site's ``mimetypes`` may
#: name any of them).
_SCRIPT_TYPES = frozenset({
    "application/ecmascript", "application/javascript", "application/x-ecmascript", "application/x-javascript",
    "text/ecmascript", "text/javascript", "text/javascript1.0", "text/javascript1.1", "text/javascript1.2",
    "text/javascript1.3", "text/javascript1.4", "text/javascript1.5", "text/jscript", "text/livescript",
    "text/x-ecmascript", "text/x-javascript"})
#: What a page loads as its own code, sent as text when not trusted: scripts, and stylesheets,
#: which a ``<link rel=stylesheet>`` applies only as ``text/css`` under ``nosniff`` (an uploaded
#: one would get around a ``style-src 'self'`` policy, to restyle the page or read it by selectors).
_CODE_TYPES = _SCRIPT_TYPES | {"text/css"}
#: Text types outside ``text/*`` that get a charset.
_TEXT_TYPES = frozenset({"application/javascript", "application/json", "application/xml", "application/ld+json",
                         "application/manifest+json"})

#: The Unicode categories of characters no file name holds: controls, line and paragraph separators.
_BREAKS = frozenset({"Cc", "Zl", "Zp"})
#: The characters that reorder or mark the direction of what follows them (Unicode's bidirectional
#: formatting characters): a name holding them shows another order than its own.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: A type and subtype (RFC 9110 tokens), without parameters.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+")
DEFAULT = "application/octet-stream"
DISPOSITIONS = (None, "inline", "attachment")


def _standard_types() -> dict[str, str]:
    """Python's own table (not the machine's ``/etc/mime.types``), so every host agrees."""
    table = mimetypes.MimeTypes()
    return {**table.types_map[False], **table.types_map[True], **_MORE_TYPES, **_AGREED_TYPES}


class ContentPolicy:
    """The headers that describe a key's bytes to a browser: type, sandbox, disposition.

    :param mimetypes: extra extensions (or name endings such as ``".tar.gz"``) → types; they take
        precedence over the table.
    :param charset: added to text types (``text/*``, JavaScript, JSON, XML); ``None``: none.
    :param trusted_files: serve HTML, SVG, XML, JavaScript and CSS as they are: ``True`` for a
        MogileFS holding only the site's own assets (never users' uploads), or the key prefixes
        under which only the site writes (``["static/"]``).
    :param content_disposition: ``"attachment"`` (download, with the key's file name),
        ``"inline"`` (with the file name), or ``None`` (no header).
    """

    def __init__(self, *, mimetypes: Mapping[str, str] | None = None, charset: str | None = "utf-8",
                 trusted_files: bool | Sequence[str] = False, content_disposition: str | None = None) -> None:
        if content_disposition not in DISPOSITIONS:
            raise ValueError(f"content_disposition must be one of {DISPOSITIONS}, not {content_disposition!r}")
        for ending, media_type in (mimetypes or {}).items():
            # A bare type: the charset is the policy's, and the sandbox knows types by their name.
            if not (isinstance(ending, str) and ending.startswith(".") and isinstance(media_type, str)
                    and _MEDIA_TYPE.fullmatch(media_type)):
                raise ValueError(f"mimetypes maps a name ending like '.webp' to a type like 'image/webp' "
                                 f"(no parameters), not {ending!r} to {media_type!r}")
        self._types = {ending.lower(): media_type for ending, media_type in _standard_types().items()}
        self._endings = sorted((ending.lower() for ending in mimetypes or {}), key=len, reverse=True)
        self._types.update({ending.lower(): media_type.lower() for ending, media_type in (mimetypes or {}).items()})
        self.charset = charset
        #: Keys starting with one of these are the site's own ("": every key).
        self.trusted_prefixes: tuple[str, ...] = (
            ("",) if trusted_files is True else () if trusted_files is False else tuple(trusted_files))
        self.content_disposition = content_disposition

    def media_type(self, key: str) -> str:
        """The type of ``key`` from its last segment's extension (the site's endings first)."""
        name = key.rpartition("/")[2].lower()
        for ending in self._endings:
            if name.endswith(ending) and len(name) > len(ending):
                return self._types[ending]
        stem, dot, extension = name.rpartition(".")
        return self._types.get(dot + extension, DEFAULT) if dot and stem else DEFAULT

    def headers(self, key: str) -> Headers:
        """``Content-Type`` and, as the policy says, ``Content-Security-Policy`` and ``Content-Disposition``."""
        media_type = self.media_type(key)
        headers: Headers = []
        if not key.startswith(self.trusted_prefixes):
            if media_type in _CODE_TYPES:
                media_type = "text/plain"  # readable as text, never run or applied as the site's code
            elif media_type in _DOCUMENT_TYPES or media_type.endswith("+xml"):
                headers.append(("Content-Security-Policy", "sandbox"))
        if self.charset and (media_type.startswith("text/") or media_type in _TEXT_TYPES
                             or media_type.endswith(("+xml", "+json"))):
            media_type = f"{media_type}; charset={self.charset}"
        headers.insert(0, ("Content-Type", media_type))
        if self.content_disposition:
            headers.append(("Content-Disposition", content_disposition(self.content_disposition, key)))
        return headers


def content_disposition(disposition: str, key: str) -> str:
    """``Content-Disposition`` naming the key's last segment (RFC 6266): an ASCII ``filename`` for
    old clients and the exact name as UTF-8 in ``filename*`` (RFC 8187), without the controls and
    line breaks a view's ``filename`` may hold, nor the bidirectional controls that make
    ``x\u202egnp.exe`` read as ``xexe.png`` (the joiners of Persian words and of emoji stay)."""
    name = "".join(char for char in key.rpartition("/")[2]
                   if char not in _BIDI_CONTROLS and unicodedata.category(char) not in _BREAKS) or "download"
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    value = f'{disposition}; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value
