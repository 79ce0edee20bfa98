"""Placing a file's data on devices: replicating up to the class's mindevcount, and removing it.

Unlike mogilefsd's background replicator, replication here runs synchronously (the command that
needs it answers once the copies exist), which makes tests deterministic. Copies that could not
be made then, for want of a live device, are made by :class:`Repairer` once a device comes back.
Copies go over HTTP, streamed from a node holding the file to a live device on a host that holds
no copy yet.
"""

from __future__ import annotations

import logging
import random
import threading

from . import httpstore
from .dispatch import Context
from .metadata import DeviceRow

log = logging.getLogger(__name__)


def replicate(ctx: Context, fid: int) -> None:
    """Copy ``fid`` to more live devices (one per host) until its class's mindevcount is met."""
    store = ctx.store
    row = store.file_by_fid(fid)
    if row is None:
        return
    cls = store.class_by_id(row.dmid, row.classid)
    devices = {device.devid: device for device in store.devices()}
    holders = [devices[devid] for devid in store.replica_devids(fid) if devid in devices]
    live = ctx.monitor.live_devices()
    sources = [device for device in holders if device in live]
    used_hosts = {device.hostid for device in holders}
    targets = [device for device in live if device.hostid not in used_hosts]
    random.shuffle(targets)
    count = len(holders)
    for target in targets:
        if count >= cls.mindevcount or not sources:
            return
        if target.hostid in used_hosts:
            continue
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
        log.warning("replica of fid %d on dev%d has MD5 %s, expected %s", fid, target.devid, digest, known)
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


class Repairer:
    """A daemon thread that, when asked, replicates every file short of its mindevcount."""

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
                    replicate(self._ctx, fid)
            except Exception:  # a failed pass must not end the worker
                log.warning("repair pass failed", exc_info=True)
