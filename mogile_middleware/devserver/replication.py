"""Placing a file's data on devices: replicating up to the class's mindevcount, and removing it.

By default this runs synchronously (the command that needs it answers once the copies exist and
the dropped data is gone), which makes tests deterministic. With a delay, :class:`BackgroundWork`
does it that many seconds later on a :class:`~.scheduler.Scheduler` thread, as mogilefsd's
replicate and delete jobs do. Copies that could not be made, for want of a live device, are made
by :class:`Repairer` once a device comes back. Copies go over HTTP, streamed from a node holding
the file to a live device, on a host that holds no copy yet while there is one.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from functools import partial

from . import httpstore
from .dispatch import Context
from .metadata import DeviceRow
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def replicate(ctx: Context, fid: int) -> None:
    """Copy ``fid`` to more live devices until its class's mindevcount is met, or drop the copies
    beyond it (a class that keeps fewer: mogilefsd's "too happy" files). As ``MultipleHosts()``
    places them: one per host holding none, then, with no such host left to take one, on other
    devices of the hosts holding one (mogilefsd's "desperate" devices)."""
    store = ctx.store
    row = store.file_by_fid(fid)
    if row is None:
        return
    cls = store.class_by_id(row.dmid, row.classid)
    devices = {device.devid: device for device in store.devices()}
    holders = [devices[devid] for devid in store.replica_devids(fid) if devid in devices]
    sources = [device for device in holders if ctx.monitor.readable(device)]
    if len(sources) > cls.mindevcount:
        extra = [device for device in holders if device not in sources] + sources[cls.mindevcount:]
        for device in extra[:len(holders) - cls.mindevcount]:
            store.remove_replica(fid, device.devid)
            remove_data(ctx, fid, [device.devid])
        return
    used_hosts = {device.hostid for device in holders}
    tried = {device.devid for device in holders}  # and those a copy failed to, tried no more this time
    count = len(holders)
    for desperate in (False, True):
        targets = [device for device in ctx.monitor.live_devices()
                   if device.devid not in tried and (desperate or device.hostid not in used_hosts)]
        random.shuffle(targets)
        for target in targets:
            if count >= cls.mindevcount or not sources:
                return
            if not desperate and target.hostid in used_hosts:
                continue
            tried.add(target.devid)
            if _copy(ctx, fid, row.length, sources[0], target, cls.hashtype is not None):
                used_hosts.add(target.hostid)
                count += 1


def _copy(ctx: Context, fid: int, length: int, source: DeviceRow, target: DeviceRow, hashed: bool) -> bool:
    url = target.url_for(fid)
    try:
        digest = httpstore.copy(source.url_for(fid), url, length)
    except httpstore.StorageHTTPError:
        log.warning("replication of fid %d to dev%d failed", fid, target.devid, exc_info=True)
        httpstore.delete(url)
        return False
    known = ctx.store.checksum(fid)
    if hashed and known is not None and known != f"MD5:{digest}":
        log.warning("replica of fid %d on dev%d has MD5 %s, expected %r", fid, target.devid, digest, known)
        httpstore.delete(url)
        return False
    if not ctx.store.add_replica(fid, target.devid):  # the key was deleted meanwhile
        httpstore.delete(url)
        return False
    if hashed and known is None:
        ctx.store.set_checksum(fid, "MD5", digest)
    return True


def remove_data(ctx: Context, fid: int, devids: list[int]) -> None:
    """Delete the copies of ``fid`` from the given devices (a node that is down keeps its orphan)."""
    devices = {device.devid: device for device in ctx.store.devices()}
    for devid in devids:
        if devid in devices and not httpstore.delete(devices[devid].url_for(fid)):
            log.info("could not delete fid %d from dev%d", fid, devid)


class BackgroundWork:
    """The work a command leaves behind: copies up to mindevcount, deleting the data of dropped fids.

    With ``delay`` 0 it is done at once, inside the command. With a delay it is done ``delay``
    seconds later on a scheduler thread, and a repair pass leaves a fid whose copies are not due
    yet alone. On :meth:`stop` the work not yet due is dropped: missing copies are then made by
    the next repair pass (run when a device is seen coming up, as on a new tracker's first
    check), and the files of dropped fids stay on the nodes as orphans, as when a node is down.
    """

    def __init__(self, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError(f"the replication delay cannot be negative: {delay}")
        self.delay = delay
        self._scheduler = Scheduler()
        self._copies_due: Counter[int] = Counter()  # fid -> delayed replications not run yet
        self._lock = threading.Lock()

    def replicate(self, ctx: Context, fid: int) -> None:
        """Copy ``fid`` up to its class's mindevcount, now or after the delay."""
        if not self.delay:
            replicate(ctx, fid)
            return
        with self._lock:
            self._copies_due[fid] += 1
        self._scheduler.call_later(self.delay, partial(self._replicate_when_due, ctx, fid))

    def _replicate_when_due(self, ctx: Context, fid: int) -> None:
        with self._lock:
            self._copies_due[fid] -= 1
            if not self._copies_due[fid]:
                del self._copies_due[fid]
        replicate(ctx, fid)

    def remove(self, ctx: Context, fid: int, devids: list[int]) -> None:
        """Delete the copies of a fid that is gone from the metadata, now or after the delay."""
        if self.delay:
            self._scheduler.call_later(self.delay, partial(remove_data, ctx, fid, devids))
        else:
            remove_data(ctx, fid, devids)

    def replicate_now(self, ctx: Context) -> int:
        """Make the delayed copies at once; returns how many files had copies to come."""
        with self._lock:
            fids = list(self._copies_due)
        for fid in fids:
            replicate(ctx, fid)
        return len(fids)

    def copies_due(self, fid: int) -> bool:
        """Whether ``fid`` still has a delayed replication to come."""
        with self._lock:
            return fid in self._copies_due

    def start(self) -> None:
        """Start the scheduler thread (none is needed without a delay)."""
        if self.delay:
            self._scheduler.start()

    def stop(self) -> None:
        """Drop the work not yet due; return once the action in progress, if any, is done."""
        self._scheduler.stop()
        with self._lock:
            self._copies_due.clear()


class Repairer:
    """A daemon thread that, when asked, replicates every file short of its mindevcount.

    Files whose delayed copies are still to come (see :class:`BackgroundWork`) are left alone.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Ask for a pass over the under-replicated files (cheap; passes do not pile up)."""
        self._wake.set()

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="mogile-dev-repair", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the copy in progress, if any."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while self._wake.wait() and not self._stopping.is_set():
            self._wake.clear()
            try:
                for fid in self._ctx.store.under_replicated():
                    if self._stopping.is_set():
                        return
                    if not self._ctx.work.copies_due(fid):
                        replicate(self._ctx, fid)
            except Exception:  # a failed pass must not end the worker
                log.warning("repair pass failed", exc_info=True)
