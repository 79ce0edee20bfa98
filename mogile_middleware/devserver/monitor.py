"""What the tracker's monitor sees of every device: its observed state and its disk figures.

As mogilefsd's monitor job, a daemon thread fetches the usage file (``/devN/usage``) of every
device it may read from, about every half second, so a stopped node drops out of ``get_paths``
and ``create_open`` quickly and comes back once it answers again. An answer makes the device
``writeable`` (``readable`` when its state forbids writing) and gives its disk figures; no answer
makes it ``unreachable`` once its host has answered before (never-reached hosts leave it blank,
as there). Devices in a state the monitor skips (down, dead, or on such a host) keep what was
last observed. A device seen becoming writeable triggers ``on_recovery``, and so does one seen
writeable again after a round skipped it (marked down, then alive): its missing copies are made.

Knowingly unlike mogilefsd, a node answering HTTP for the device directory but with no usage file
(a plain web server docroot added with ``add_storage_node``) counts as writeable, without figures;
mogilefsd would call it unreachable. The monitor does not test-write; the development storage
node accepts writes whenever it answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import diskusage, httpstore
from .metadata import DeviceRow, MetadataStore
from .states import may_delete_from, may_get_new_files, may_read

log = logging.getLogger(__name__)

#: Seconds between two rounds of checks.
INTERVAL = 0.5
#: Seconds a node may take to answer for a device's usage file.
FETCH_TIMEOUT = 2.0


@dataclass(frozen=True)
class Observation:
    """The last observation of a device: ``state`` is ``""`` (never seen), writeable, readable or unreachable.

    ``used_kib`` / ``total_kib`` are the last disk figures read (``None`` before any); ``checked``
    tells whether the device was ever seen writeable, which is when mogilefsd checks that its node
    rejects uploads with a wrong Content-MD5 (``reject_bad_md5``).
    """

    state: str = ""
    used_kib: int | None = None
    total_kib: int | None = None
    checked: bool = False

    def mb_figures(self) -> tuple[int, int] | None:
        """``(mb_total, mb_used)`` as the tracker reports them, or ``None`` before any figures."""
        if self.used_kib is None or self.total_kib is None:
            return None
        return self.total_kib // 1024, self.used_kib // 1024


def probe(device: DeviceRow) -> tuple[bool, tuple[int, int] | None]:
    """Whether the device's node answers for it, and its ``(used, total)`` KiB from the usage file."""
    base = f"{device.base_url}/dev{device.devid}/"
    answer = httpstore.fetch(base + diskusage.USAGE_FILE, FETCH_TIMEOUT)
    if answer is None:
        return False, None
    status, body = answer
    figures = diskusage.parse_usage(body) if status == 200 else None
    if figures is not None:
        return True, figures
    directory = httpstore.fetch(base, FETCH_TIMEOUT)
    return directory is not None and directory[0] == 200, None


class DeviceMonitor:
    """Keeps the observed state and disk figures of every registered device fresh."""

    def __init__(
        self, store: MetadataStore, on_recovery: Callable[[], None] | None = None, interval: float = INTERVAL
    ) -> None:
        self._store = store
        self._on_recovery = on_recovery
        self._interval = interval
        self._seen: dict[int, Observation] = {}
        self._skipped: set[int] = set()  # devices the last round did not look at
        self._reached_hosts: set[int] = set()
        self._round = threading.Lock()  # one round at a time: the thread's, or one a command asked for
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_all(self) -> None:
        """Look at every device the monitor may read from, now."""
        with self._round:
            recovered = False
            for device in self._store.devices():
                if may_read(device.status, device.host_status):
                    before = self._seen.get(device.devid, Observation())
                    after = self._observe(device, before)
                    back = before.state != "writeable" or device.devid in self._skipped
                    recovered |= after.state == "writeable" and back
                    self._skipped.discard(device.devid)
                else:
                    self._skipped.add(device.devid)
        if recovered and self._on_recovery is not None:
            self._on_recovery()

    def _observe(self, device: DeviceRow, before: Observation) -> Observation:
        reached, figures = probe(device)
        if reached:
            self._reached_hosts.add(device.hostid)
            writeable = may_delete_from(device.status, device.host_status)
            used, total = figures if figures is not None else (before.used_kib, before.total_kib)
            after = Observation("writeable" if writeable else "readable", used, total, before.checked or writeable)
        elif device.hostid in self._reached_hosts:
            after = Observation("unreachable", before.used_kib, before.total_kib, before.checked)
        else:
            after = before
        self._seen[device.devid] = after
        return after

    def observation(self, device: DeviceRow) -> Observation:
        """The last observation of a device (a device the monitor may read from and never saw is looked at now)."""
        seen = self._seen.get(device.devid)
        if seen is None and may_read(device.status, device.host_status):
            with self._round:
                seen = self._observe(device, Observation())
        return seen or Observation()

    def readable(self, device: DeviceRow) -> bool:
        """Whether files may be read from the device: its state allows it and its node answered last time."""
        return may_read(device.status, device.host_status) and self.observation(device).state in (
            "writeable",
            "readable",
        )

    def live_devices(self) -> list[DeviceRow]:
        """The devices that may get new files and were writeable at the last check."""
        return [
            device
            for device in self._store.devices()
            if may_get_new_files(device.status, device.host_status) and self.observation(device).state == "writeable"
        ]

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
