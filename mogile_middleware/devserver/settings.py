"""The server settings commands of the development tracker: server_settings, server_setting, set_server_setting.

Which settings may be written and how their values are checked and normalised follow mogilefsd
2.73's ``MogileFS::Config::server_setting_is_writable``, error texts included (they name the line
of Config.pm that refused the value, as clients see it). Settings are stored and reported; of
them, the development tracker acts on ``case_sensitive_list_keys`` only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from .dispatch import CommandError, Context, Handler, Reply, perl_true

#: Normalises a value (``None``: the setting is removed) or raises :class:`_InvalidFormat`.
Cleaner = Callable[[str | None], str | None]


class _InvalidFormat(Exception):
    """A value a writable setting does not accept; the text is mogilefsd's ``die`` message."""

    def __init__(self, message: str, config_line: int) -> None:
        super().__init__(f"{message} at lib/MogileFS/Config.pm line {config_line}.\n")


def _any(value: str | None) -> str | None:
    return value


def _delete_if_blank(value: str | None) -> str | None:
    return value if perl_true(value) else None


def _boolean(value: str | None) -> str | None:
    if not perl_true(value) or re.match(r"(0|f|off|n)", value or "", re.IGNORECASE):
        return "0"
    if re.match(r"(1|t|on|y)", value or "", re.IGNORECASE):
        return "1"
    raise _InvalidFormat("Unknown format", 344)


def _number(value: str | None) -> str | None:
    if not perl_true(value):
        return "0"
    if re.fullmatch(r"\d+\n?", value or ""):
        return value
    raise _InvalidFormat("Must be numeric", 350)


def _netmask_list(value: str | None) -> str | None:
    for netmask in re.split(r"[,\s]+", value or ""):
        if netmask and not _is_netmask(netmask):
            raise _InvalidFormat("Doesn't match an acceptable netmask", 362)
    return value


def _is_netmask(text: str) -> bool:
    """Whether Net::Netmask reads ``text``: ``10.0.0.0/8``, ``10.0.0.1``, ``10.0.0.0:255.0.0.0``, ``default``."""
    if text in ("default", "any"):
        return True
    try:
        ipaddress.IPv4Network(text.replace(":", "/", 1), strict=False)
    except ValueError:
        return False
    return True


def _checksum(value: str | None) -> str | None:
    if value == "off":
        return "off"
    if value == "class":
        return None
    if value in ("MD5", "SHA-1"):
        return value
    raise _InvalidFormat("Not a valid checksum algorithm", 394)


_CLEANERS: dict[str, Cleaner] = {
    "skip_devcount": _boolean,
    "skip_mkcol": _boolean,
    "case_sensitive_list_keys": _boolean,
    "memcache_servers": _any,
    "memcache_ttl": _number,
    "internal_queue_limit": _number,
    "network_zones": _any,
    "fsck_checksum": _checksum,
}


def cleaner_for(key: str) -> Cleaner | None:
    """How a setting's value is checked before it is stored; ``None`` when the setting is not writable."""
    if key.startswith("slave_"):
        return _delete_if_blank
    if key in _CLEANERS:
        return _CLEANERS[key]
    if key.startswith("zone_"):
        return _netmask_list
    if key.startswith("queue_"):
        return _any
    return None


def is_readable(key: str) -> bool:
    """Whether ``server_settings`` lists a setting (fsck's own state is not listed)."""
    return key == "fsck_checksum" or not key.startswith("fsck_")


def server_settings(ctx: Context, args: dict[str, str]) -> Reply:
    """The readable server settings, as ``key_N`` / ``value_N``."""
    settings = [(name, value) for name, value in ctx.store.server_settings() if is_readable(name)]
    reply: dict[str, str | int] = {"key_count": len(settings)} if settings else {}
    for number, (name, value) in enumerate(settings, 1):
        reply[f"key_{number}"] = name
        reply[f"value_{number}"] = value
    return reply


def server_setting(ctx: Context, args: dict[str, str]) -> Reply:
    """One server setting (an empty value when unset)."""
    key = args.get("key", "")
    if not perl_true(key):
        raise CommandError("bad_params")
    return {"key": key, "value": ctx.store.server_setting(key) or ""}


def set_server_setting(ctx: Context, args: dict[str, str]) -> Reply:
    """Store a writable setting (normalised; some values remove it); ``slave_*`` settings bump slave_version."""
    key = args.get("key", "")
    if not perl_true(key):
        raise CommandError("bad_params")
    clean = cleaner_for(key)
    if clean is None:
        raise CommandError("not_writable")
    try:
        value = clean(args.get("value"))
    except _InvalidFormat as exc:
        raise CommandError("invalid_format", str(exc)) from None
    ctx.store.set_server_setting(key, value)
    if key.startswith("slave_"):
        ctx.store.increment_server_setting("slave_version")
    return None


SETTINGS_COMMANDS: dict[str, Handler] = {
    "server_settings": server_settings,
    "server_setting": server_setting,
    "set_server_setting": set_server_setting,
}
