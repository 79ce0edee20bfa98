"""The states an administrator gives hosts and devices, and what each state lets the tracker do.

As mogilefsd's ``MogileFS::DeviceState`` and ``MogileFS::Host``: a device is read from when it is
alive, readonly or drain on a host that is alive or readonly; it gets new files (and copies)
only when it and its host are alive; the monitor only looks at devices it may read from.
"""

from __future__ import annotations

HOST_STATES = frozenset({"alive", "dead", "down", "readonly"})
DEVICE_STATES = frozenset({"alive", "dead", "down", "readonly", "drain"})

_READABLE_DEVICE_STATES = frozenset({"alive", "readonly", "drain"})
_READABLE_HOST_STATES = frozenset({"alive", "readonly"})


def may_read(device_status: str, host_status: str) -> bool:
    """Whether files may be read from (and the monitor looks at) a device in this state."""
    return device_status in _READABLE_DEVICE_STATES and host_status in _READABLE_HOST_STATES


def may_get_new_files(device_status: str, host_status: str) -> bool:
    """Whether new files and copies may be placed on a device in this state."""
    return device_status == "alive" and host_status == "alive"


def may_delete_from(device_status: str, host_status: str) -> bool:
    """Whether files may be deleted from (so written to) a device: the monitor test-writes only these."""
    return device_status in ("alive", "drain") and host_status == "alive"
