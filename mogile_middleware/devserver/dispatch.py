"""Command dispatch of the development tracker: one request line in, one reply line out.

Handlers take the decoded arguments and return the ``OK`` arguments, or raise
:class:`CommandError`; here the reply is formatted as mogilefsd does it (error texts, ``callid``
echo), and any other exception becomes ``ERR failure``, so no input can take the tracker down.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..protocol import format_err, format_ok, parse_request
from .metadata import MetadataStore
from .monitor import DeviceMonitor

if TYPE_CHECKING:  # replication imports this module
    from .replication import BackgroundWork

log = logging.getLogger(__name__)

#: mogilefsd's texts for error codes; any other code is sent with the code as its text.
ERROR_TEXTS = {
    "after_mismatch": "Pattern does not match the after-value?",
    "bad_params": "Invalid parameters to command; please see documentation",
    "class_exists": "That class already exists in that domain",
    "class_has_files": "Class still has files, unable to delete",
    "class_not_found": "Class not found",
    "domain_exists": "That domain already exists",
    "domain_has_files": "Domain still has files, unable to delete",
    "domain_not_found": "Domain not found",
    "failure": "Operation failed",
    "host_exists": "That host already exists",
    "host_mismatch": "The device specified doesn't belong to the host specified",
    "host_not_empty": "Unable to delete host; it contains devices still",
    "host_not_found": "Host not found",
    "invalid_mindevcount": "The mindevcount must be at least 1",
    "key_exists": "Target key name already exists; can't overwrite.",
    "no_class": "No class provided",
    "no_device": "Device not found",
    "no_devices": "No devices found to store file",
    "no_domain": "No domain provided",
    "no_host": "No host provided",
    "no_ip": "IP required to create host",
    "no_port": "Port required to create host",
    "no_temp_file": "No tempfile or file already closed",
    "nodel_default_class": "Cannot delete the default class",
    "none_match": "No keys match that pattern and after-value (if any).",
    "state_too_high": "Status cannot go from dead to alive; must use down",
    "unknown_command": "Unknown server command",
    "unknown_host": "Host not found",
    "unknown_state": "Invalid/unknown state",
    "unreg_domain": "Domain name invalid/not found",
}

#: 2**63: no 64-bit signed integer reaches it.
_INT64_LIMIT = 2**63
_PERL_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")

Reply = Mapping[str, str | int] | None


@dataclass(frozen=True)
class Context:
    """What a command handler works with: the metadata, the live view of the devices, the work it
    leaves, and the seconds an overwrite leaves its key unknown (see :class:`~.tracker_server.TrackerServer`)."""

    store: MetadataStore
    monitor: DeviceMonitor
    work: BackgroundWork
    overwrite_gap: float = 0.0


Handler = Callable[[Context, dict[str, str]], Reply]


class CommandError(Exception):
    """Answer the current request with ``ERR <code> <text>``."""

    def __init__(self, code: str, text: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.text = text


def perl_true(value: str | None) -> bool:
    """Truth of an argument as Perl sees it: missing, empty and ``"0"`` are false."""
    return value not in (None, "", "0")


def perl_int(value: str | None) -> int:
    """An argument as a Perl number, truncated: its leading number, or 0 (``"12abc"`` is 12). One
    beyond a 64-bit integer (``1e999``, which Perl reads as infinity) is the largest one of its
    sign, which compares as Perl's does with any count, id or limit (SQLite holds no larger)."""
    match = _PERL_NUMBER.match(value or "")
    if not match:
        return 0
    number = float(match.group(1))
    if abs(number) < _INT64_LIMIT:
        return int(number)
    return _INT64_LIMIT - 1 if number > 0 else 1 - _INT64_LIMIT


def require_domain(ctx: Context, args: Mapping[str, str]) -> int:
    """The dmid of the ``domain`` argument (``no_domain`` / ``unreg_domain`` otherwise)."""
    domain = args.get("domain")
    if not domain:
        raise CommandError("no_domain")
    dmid = ctx.store.domain_id(domain)
    if dmid is None:
        raise CommandError("unreg_domain")
    return dmid


def respond(ctx: Context, handlers: Mapping[str, Handler], line: bytes) -> bytes:
    """The reply line for one request line (its terminator already removed)."""
    parsed = parse_request(line)
    if parsed is None:
        return format_err("unknown_command", ERROR_TEXTS["unknown_command"])
    command, args = parsed
    callid = args.get("callid")
    try:
        handler = handlers.get(command)
        if handler is None:
            raise CommandError("unknown_command")
        reply = dict(handler(ctx, args) or {})
    except CommandError as exc:
        return format_err(exc.code, exc.text or ERROR_TEXTS.get(exc.code), callid)
    except Exception:
        log.exception("command %r failed", command)
        return format_err("failure", ERROR_TEXTS["failure"], callid)
    if callid is not None:
        reply["callid"] = callid
    return format_ok(reply)
