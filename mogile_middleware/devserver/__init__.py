"""An embedded development MogileFS: a tracker and storage nodes in one Python process.

For development and tests only; it is not a replacement for MogileFS and must not hold data that
matters. The tracker speaks mogilefsd's (2.73) line protocol with its framing, error codes and
reply fields, admin commands included (hosts, devices, domains, classes, server settings), so
``mogadm`` works against it; the storage nodes answer HTTP as mogstored (Perlbal) does, quirks
and disk usage files included. Where it knowingly differs (by default replication and deletion
happen before the command answers, unless a ``replication_delay`` is set; no profiling output,
no I/O utilization, no fsck or rebalance), the modules say so.

    with DevMogileFS(domains={"media": {"image": 2}}) as mogile:
        mogile.trackers  # ["127.0.0.1:PORT"], to give a MogileFS client
"""

from __future__ import annotations

from .cluster import DevMogileFS
from .metadata import MetadataStore, fid_path
from .storage_node import StorageNode
from .tracker_server import TrackerServer

__all__ = [
    "DevMogileFS",
    "MetadataStore",
    "StorageNode",
    "TrackerServer",
    "fid_path",
]
