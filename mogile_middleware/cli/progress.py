"""A one-line progress bar for transfers on a terminal: percentage, bytes and rate; and
:func:`printable` (:func:`quoted`, :func:`shown`), which makes text from the network safe to show there.

Used by the ``upload`` and ``get`` subcommands on stderr, so their stdout stays the data or the
list of keys.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

#: Terminal width assumed when the stream cannot tell its own.
DEFAULT_COLUMNS = 80


def _escapes() -> dict[int, str]:
    """The escapes of :func:`printable` that are not ``\\uNNNN`` (see :func:`_code_point`)."""
    table = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}
    # A backslash doubled: no key shows as another's escapes (a key "\\xff" is not the byte 0xff).
    table.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord("\\"): "\\\\"})
    # A byte that is not UTF-8 arrives as a surrogate escape (see protocol): shown as that byte,
    # never written raw (a lone 0x9B is CSI to some terminals).
    table.update({0xDC00 + byte: f"\\x{byte:02x}" for byte in range(0x80, 0x100)})
    return table


_ESCAPES = _escapes()


def _code_point(char: str) -> str:
    """``\\uNNNN`` (``\\UNNNNNNNN``): a character by its code point, even below 0x100, where
    ``\\xNN`` is a byte that is not UTF-8."""
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


#: The name of the error handler :func:`escape_unshowable` is registered under.
UNSHOWABLE = "mogile-middleware-escape"


def escape_unshowable(error: UnicodeError) -> tuple[str, int]:
    """Write the characters the locale cannot show by their code points (Python's
    ``backslashreplace`` writes ``\\xe9``: how :func:`printable` shows the byte 0xE9 that is
    not UTF-8, another key)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    return "".join(map(_code_point, error.object[error.start:error.end])), error.end


codecs.register_error(UNSHOWABLE, escape_unshowable)


#: Printable to ``str.isprintable`` but invisible, or blank though not a space: a key with one
#: would show as a key without it, or with a space (Unicode's default-ignorable marks, variation
#: selectors, the Hangul fillers, the blank braille cell).
_INVISIBLE = frozenset(map(chr, (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x1810), 0x2800, 0x3164,
                                 *range(0xFE00, 0xFE10), 0xFFA0, *range(0xE0100, 0xE01F0))))


def printable(text: str) -> str:
    """``text`` safe to show, each escape naming one thing: ``\\n``, ``\\t``, ``\\r``; ``\\xNN``
    a control character below 0x80 or, from 0x80, a byte that is not UTF-8; ``\\uNNNN`` any
    other character not printable or invisible (a C1 control, a bidirectional or zero-width
    one, a variation selector, a blank other than the space); a backslash doubled. A key or a
    tracker's message then cannot recolour the terminal, move its cursor, forge a line of output,
    reorder what follows or pass for another key. Printable Unicode is kept as it is."""
    if text.isprintable() and "\\" not in text and _INVISIBLE.isdisjoint(text):
        return text
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate escapes no byte
        # UTF-8 bytes a file name's decoding escaped (LC_ALL=C: ASCII) read as their characters.
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
    return "".join(_ESCAPES.get(ord(char)) or (char if char.isprintable() and char not in _INVISIBLE
                                               else _code_point(char)) for char in text)


def quoted(text: str) -> str:
    """``text`` in quotes, :func:`printable`, as a line of messages names a key (as ``ls`` shows it)."""
    return f"'{printable(text)}'"


def shown(error: Exception) -> str:
    """``error``'s message, printable; the keys, classes and domains a package error names quoted
    as ``ls`` shows them (its own message gives their ``repr``, whose escapes printable would escape again)."""
    naming = getattr(error, "naming", None)
    if naming is None:
        return printable(str(error))
    template, names = naming
    code = getattr(error, "code", None)  # a tracker's error code; a lost answer has none
    return (f"{printable(code)}: " if code else "") + template.format_map(
        {name: quoted(str(value)) for name, value in names.items()})


def human_size(count: float) -> str:
    """``count`` bytes in binary units, for people: ``512 B``, ``1.5 KiB``, ``12.0 MiB``."""
    unit = 0
    while count >= 1024 and unit < len(UNITS) - 1:
        count /= 1024
        unit += 1
    return f"{count:.0f} B" if unit == 0 else f"{count:.1f} {UNITS[unit]}"


class ProgressBar:
    """Shows how far a transfer of ``total`` bytes is, redrawn in place on ``stream``.

    It writes nothing unless ``stream`` is a terminal and ``total`` is known, so piped or logged
    output stays clean. Redrawn at most once per ``interval`` seconds (and always on reaching the
    total); :meth:`close` clears the line.
    """

    def __init__(
        self,
        total: int | None,
        stream: TextIO,
        *,
        label: str = "",
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream
        self.label = printable(label)
        self.interval = interval
        self._clock = clock
        self._enabled = total is not None and stream.isatty()
        self._started = clock()
        self._drawn_at: float | None = None
        self._width = 0  # of the line on screen, to blank it

    def update(self, done: int) -> None:
        """Note that ``done`` bytes are through; redraw when the interval has passed or all are."""
        if not self._enabled or self.total is None:
            return
        now = self._clock()
        if done < self.total and self._drawn_at is not None and now - self._drawn_at < self.interval:
            return
        self._drawn_at = now
        self._draw(self._line(done, self.total, now - self._started))

    def _line(self, done: int, total: int, elapsed: float) -> str:
        percent = min(done * 100 // total, 100) if total else 100
        rate = f"{human_size(done / elapsed)}/s" if elapsed > 0 else "-"
        stats = f"{percent:3d}% {human_size(done)} / {human_size(total)} {rate}"
        room = self._columns() - 2 - len(stats)  # a space before the stats; the last column stays free
        if not self.label or room < 2:
            return stats
        label = self.label if len(self.label) <= room else "…" + self.label[len(self.label) - room + 1 :]
        return f"{label} {stats}"

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # a stream without a terminal behind it
            return DEFAULT_COLUMNS

    def _draw(self, line: str) -> None:
        self._write("\r" + line.ljust(self._width))
        self._width = len(line)

    def close(self) -> None:
        """Clear the bar, leaving the cursor where the line began."""
        if self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    def _write(self, text: str) -> None:
        """Show ``text``; a terminal that has gone (EIO once the ssh session closed) ends the bar,
        not the transfer, nor the way out of one stopped by SIGHUP."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self._enabled = False
            self._width = 0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
