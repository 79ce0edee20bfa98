"""Which storage devices are reachable, as the tracker's monitor job sees them.

A daemon thread tries a TCP connection to every device's node about every half second, so a
stopped node drops out of ``get_paths`` and ``create_open`` quickly and comes back once it
answers again; a device seen up after being down (or unknown) triggers ``on_recovery``.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from .metadata import DeviceRow, MetadataStore

log = logging.getLogger(__name__)

#: Seconds between two rounds of checks.
INTERVAL = 0.5
#: Seconds a single connection attempt may take.
CONNECT_TIMEOUT = 0.5


def reachable(device: DeviceRow) -> bool:
    """Whether the device's node accepts a TCP connection right now."""
    try:
        with socket.create_connection((device.hostip, device.http_port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


class DeviceMonitor:
    """Keeps the observed up/down state of every registered device fresh."""

    def __init__(
        self, store: MetadataStore, on_recovery: Callable[[], None] | None = None, interval: float = INTERVAL
    ) -> None:
        self._store = store
        self._on_recovery = on_recovery
        self._interval = interval
        self._up: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_all(self) -> None:
        """Check every device now."""
        before, self._up = self._up, {device.devid: reachable(device) for device in self._store.devices()}
        recovered = any(up and not before.get(devid) for devid, up in self._up.items())
        if recovered and self._on_recovery is not None:
            self._on_recovery()

    def is_up(self, device: DeviceRow) -> bool:
        """The last observed state of a device (checked now if it was never seen)."""
        state = self._up.get(device.devid)
        if state is None:
            state = self._up[device.devid] = reachable(device)
        return state

    def live_devices(self) -> list[DeviceRow]:
        """The devices that are alive and were reachable at the last check."""
        return [device for device in self._store.devices() if device.status == "alive" and self.is_up(device)]

    def start(self) -> None:
        """Do a first round now, then keep checking in a daemon thread."""
        self.check_all()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mogile-dev-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the checking thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check_all()
            except Exception:  # a failed round must not end the monitor
                log.warning("device check failed", exc_info=True)
