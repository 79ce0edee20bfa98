"""The disk usage file of a device directory (``/devN/usage``), as mogstored writes it and the tracker reads it.

mogstored's DiskUsage process rewrites ``devN/usage`` every 10 seconds from ``df -k`` of the device
directory: ``key: value`` lines in key order (available, device, disk, time, total, use, used;
sizes in KiB, total being used + available). The development storage node writes the same file
from :func:`os.statvfs`, computed as df does, when the file is requested and older than 10
seconds. The tracker's monitor fetches it to learn each device's ``mb_total`` / ``mb_used``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from contextlib import suppress
from pathlib import Path

#: Seconds between two rewrites of a usage file (mogstored's DiskUsage sleeps 10 s between passes).
REFRESH_SECONDS = 10.0
USAGE_FILE = "usage"

_LINE = re.compile(rb"^(\w+)\s*:\s*(.+)$")


def measure(directory: Path) -> dict[str, str | int]:
    """The usage file's fields for ``directory``: df's figures in KiB, its filesystem and the time."""
    stat = os.statvfs(directory)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize // 1024
    available = stat.f_bavail * stat.f_frsize // 1024
    total = used + available
    return {
        "available": available,
        "device": _filesystem_of(directory),
        "disk": str(directory),
        "time": int(time.time()),
        "total": total,
        "use": f"{math.ceil(used * 100 / total) if total else 0}%",  # df rounds the percentage up
        "used": used,
    }


def format_usage(fields: dict[str, str | int]) -> bytes:
    """The file's bytes: one ``key: value`` line per field, in key order."""
    return "".join(f"{name}: {fields[name]}\n" for name in sorted(fields)).encode()


def refresh(directory: Path) -> None:
    """Rewrite ``directory/usage`` unless it is younger than :data:`REFRESH_SECONDS` (atomically)."""
    target = directory / USAGE_FILE
    with suppress(OSError):
        if time.time() - target.stat().st_mtime < REFRESH_SECONDS:
            return
    fd, temp_name = tempfile.mkstemp(prefix=f".{USAGE_FILE}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(format_usage(measure(directory)))
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp_name)
        raise


def parse_usage(data: bytes) -> tuple[int, int] | None:
    """``(used, total)`` in KiB as the tracker's monitor reads them; ``None`` when either is missing or 0."""
    stats = {}
    for line in data.splitlines():
        if match := _LINE.match(line.rstrip(b"\r")):
            stats[match.group(1)] = match.group(2)
    try:
        used, total = int(stats[b"used"]), int(stats[b"total"])
    except (KeyError, ValueError):
        return None
    return (used, total) if used and total else None


def _filesystem_of(directory: Path) -> str:
    """What df names the filesystem holding ``directory`` (``/dev/vda``); its mount point if unknown."""
    path = os.path.realpath(directory)
    best_mount, best_source = "/", "/"
    with suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            source, mount = [_unescape_mount(part) for part in line.split()[:2]]
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best_mount):
                best_mount, best_source = mount, source
        return best_source
    return best_mount


def _unescape_mount(field: str) -> str:
    """A /proc/self/mounts field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)
