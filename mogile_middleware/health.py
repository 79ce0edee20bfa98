"""A MogileFS health check, as ``mogadm check`` does it: what an operator alerts on.

:func:`check` asks every tracker, each on a connection of its own, and takes the domain and its
classes, the hosts and the devices from the first that told them; it lists the problems, each a
one-line reason:

* a tracker that does not answer, or answers ``noop`` but not what it is asked next: the
  cluster as it sees it (``get_domains``, ``get_hosts``, ``get_devices``), then a read of its
  database (``list_fids`` of one file): mogilefsd answers the others from its memory, so a
  tracker whose database is down or hung answers them all;
* a domain the trackers do not know;
* a host or device the trackers mark ``down``;
* a device files are read from (``alive``, or set aside: ``readonly``, ``drain``) that the
  trackers cannot reach (observed ``unreachable``), or whose storage node does not answer HTTP
  within the timeout, which the trackers may not have noticed (mogilefsd goes on calling a hung
  mogstored writeable);
* an ``alive`` device the trackers cannot write to;
* a device with less free space than mogilefsd keeps unused (``min_free_space``, 100 MB);
* a class keeping more copies than there are writeable devices on distinct hosts (a device whose
  node does not answer is not).

Hosts and devices an operator retired (``dead``) or set aside (``readonly``, ``drain``) are
reported; only those files are still read from count when they cannot be reached.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .deadline import DeadlineReader
from .exceptions import MogileFSError, StorageError
from .protocol import Reply, parse_domains, whole_number
from .storage import Target
from .tracker import Address, TrackerPool, describe_address, parse_trackers

#: What mogilefsd leaves free on every device (its ``min_free_space`` default), in MB.
MIN_FREE_MB = 100
#: Trackers, and storage nodes, asked at once.
_NODES_AT_ONCE = 16
#: The longest status line read from a storage node (``HTTP/1.1 404 Not Found`` is 22 bytes).
_STATUS_LINE_BYTES = 256
#: The states of the hosts and devices mogilefsd reads files from (``DeviceState.pm``, ``Host.pm``):
#: one it cannot reach there leaves its files to their other copies, or to none.
_READ_HOSTS = ("alive", "readonly")
_READ_DEVICES = ("alive", "readonly", "drain")


@dataclass(frozen=True)
class TrackerHealth:
    address: str
    reachable: bool
    rtt_ms: float | None = None
    error: str = ""


@dataclass(frozen=True)
class HostHealth:
    hostid: str
    name: str
    address: str
    status: str


@dataclass(frozen=True)
class DeviceHealth:
    devid: int
    host: str
    status: str
    observed: str
    mb_total: int | None
    mb_free: int | None
    #: Whether its storage node answered a ``HEAD`` of its usage file; ``None`` where it was not
    #: asked (a device no file is read from, or one the trackers cannot reach).
    answers_http: bool | None = None


@dataclass
class Health:
    """What :func:`check` found; ``problems`` is empty when all is well."""

    trackers: list[TrackerHealth] = field(default_factory=list)
    domain: str = ""
    #: The domain's classes and their copies; ``None`` when unknown (no tracker said, or the domain
    #: is not registered): not a domain without classes.
    classes: dict[str, int] | None = None
    hosts: list[HostHealth] = field(default_factory=list)
    devices: list[DeviceHealth] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(trackers: str | Iterable[str | Address], domain: str, *, timeout: float = 3.0) -> Health:
    """The health of the MogileFS behind ``trackers`` (as :class:`~mogile_middleware.Client` takes
    them: ``"host:port"``, ``(host, port)``), for ``domain``."""
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a domain's name, not {domain!r}")
    addresses = parse_trackers(trackers)
    health = Health(domain=domain)
    # At once: hung trackers cost one timeout in all, not one each.
    with ThreadPoolExecutor(max_workers=max(1, min(len(addresses), _NODES_AT_ONCE))) as pool:
        asked = list(pool.map(lambda address: _tracker_health(address, timeout), addresses))
    health.trackers = [tracker for tracker, _ in asked]
    health.problems += [f"tracker {tracker.address} does not answer: {tracker.error}" if not tracker.reachable
                        else f"tracker {tracker.address} answers noop but not {tracker.error}"
                        for tracker in health.trackers if tracker.error]
    told = [cluster for _, cluster in asked if cluster is not None]
    if not told:
        if not any(tracker.reachable for tracker in health.trackers):
            health.problems.append("no tracker answered")
        return health
    domains, health.hosts, health.devices = told[0]
    if domain in domains:
        health.classes = {name: copies for name, (copies, _) in sorted(domains[domain].items())}
    else:
        health.problems.append(f"domain '{domain}' is not registered")  # as it is: a shower escapes it
    health.devices.sort(key=lambda device: device.devid)
    health.problems += _said_problems(health)
    _ask_storage_nodes(health, timeout)
    alive_hosts = {host.name for host in health.hosts if host.status == "alive"}
    writeable_hosts = {device.host for device in health.devices
                       if device.host in alive_hosts and _writeable(device) and device.answers_http is not False}
    for name, copies in (health.classes or {}).items():
        if copies > len(writeable_hosts):
            health.problems.append(f"class '{name}' keeps {copies} copies, but only {len(writeable_hosts)} "
                                   f"host(s) have a writeable device")
    return health


#: The domains, hosts and devices as one tracker told them.
_Cluster = tuple[dict[str, dict[str, tuple[int, str]]], list[HostHealth], list[DeviceHealth]]


def _tracker_health(address: Address, timeout: float) -> tuple[TrackerHealth, _Cluster | None]:
    """``noop`` on a connection of its own: reachable, and how fast; then the cluster as the
    tracker sees it (``None`` unless it told all of it), then a read of its database (the error
    names the request that failed or could not be read)."""
    pool = TrackerPool([address], connect_timeout=timeout, io_timeout=timeout, dead_seconds=0)
    name = describe_address(*address)
    asked = "noop"
    cluster: _Cluster | None = None
    try:
        pool.request(asked)  # the connection, made once
        start = time.perf_counter()
        pool.request(asked)
        rtt_ms = round((time.perf_counter() - start) * 1000, 3)
        asked = "get_domains"
        domains = pool.request(asked, None, parse_domains)[0]
        asked = "get_hosts"
        hosts = pool.request(asked, None, _hosts)[0]
        asked = "get_devices"
        devices = pool.request(asked, None, lambda reply: _devices(reply, hosts))[0]
        cluster = domains, hosts, devices
        asked = "list_fids (its database)"
        pool.request("list_fids", {"from": 0, "to": 1})
    except MogileFSError as error:
        said = str(error).rpartition(f"{name}: ")[2]  # the pool's message names the tracker already
        if asked == "noop":
            return TrackerHealth(name, False, error=said), None
        return TrackerHealth(name, True, rtt_ms, error=f"{asked}: {said}"), cluster
    finally:
        pool.close()
    return TrackerHealth(name, True, rtt_ms), cluster


def _hosts(reply: Reply) -> list[HostHealth]:
    return [HostHealth(reply[f"host{n}_hostid"], reply[f"host{n}_hostname"],
                       describe_address(reply[f"host{n}_hostip"], reply[f"host{n}_http_port"]),
                       reply[f"host{n}_status"])
            for n in range(1, reply.number("hosts") + 1)]


def _devices(reply: Reply, hosts: list[HostHealth]) -> list[DeviceHealth]:
    names = {host.hostid: host.name for host in hosts}
    return [DeviceHealth(devid=reply.number(f"dev{n}_devid"),
                         host=names.get(reply[f"dev{n}_hostid"], f"host {reply[f'dev{n}_hostid']}"),
                         status=reply[f"dev{n}_status"],
                         observed=reply[f"dev{n}_observed_state"],
                         mb_total=whole_number(reply[f"dev{n}_mb_total"]),
                         mb_free=whole_number(reply[f"dev{n}_mb_free"]))
            for n in range(1, reply.number("devices") + 1)]


def _said_problems(health: Health) -> list[str]:
    """The problems the trackers' lists of hosts and devices show. A device on a host the operator
    set aside (``readonly``) takes no new files by that choice: neither it nor its free space is one."""
    problems = [f"host {host.name} is down" for host in health.hosts if host.status == "down"]
    written_hosts = {host.name for host in health.hosts if host.status == "alive"}
    for device in health.devices:
        where = f"dev{device.devid} on {device.host}"
        if device.status == "down":
            problems.append(f"{where} is down")
        elif device.status in _READ_DEVICES and device.observed == "unreachable":
            problems.append(f"{where} is {device.status} but the trackers cannot reach it")
        elif device.status == "alive" and device.observed == "readable" and device.host in written_hosts:
            problems.append(f"{where} is alive but cannot be written to")
        if device.status == "alive" and device.host in written_hosts and device.mb_free is not None \
                and device.mb_free < MIN_FREE_MB:
            problems.append(f"{where} has {device.mb_free} MB free, under the {MIN_FREE_MB} MB "
                            f"MogileFS leaves unused: it takes no new files")
    return problems


def _ask_storage_nodes(health: Health, timeout: float) -> None:
    """Ask the node of each device files are read from that the trackers call reachable for a
    ``HEAD`` of its usage file (any status is an answer), as ``mogadm check`` asks them: its
    ``answers_http``, and a problem for each that does not answer."""
    addresses = {host.name: host.address for host in health.hosts if host.status in _READ_HOSTS}
    asked = [device for device in health.devices
             if device.status in _READ_DEVICES and device.observed != "unreachable" and device.host in addresses]
    urls = [f"http://{addresses[device.host]}/dev{device.devid}/usage" for device in asked]
    with ThreadPoolExecutor(max_workers=max(1, min(len(urls), _NODES_AT_ONCE))) as pool:
        reasons = list(pool.map(lambda url: _why_silent(url, timeout), urls))
    for device, reason in zip(asked, reasons):
        if reason is not None:
            health.problems.append(f"dev{device.devid} on {device.host} ({addresses[device.host]}) "
                                   f"does not answer HTTP: {reason}")
    answered = {device.devid: reason is None for device, reason in zip(asked, reasons)}
    health.devices = [replace(device, answers_http=answered.get(device.devid)) for device in health.devices]


def _why_silent(url: str, timeout: float) -> str | None:
    """``None`` once the node of ``url`` answers a ``HEAD`` with a status line within ``timeout``,
    however slowly it trickles in, else why not."""
    deadline = time.monotonic() + timeout
    try:
        target = Target(url)
        with socket.create_connection(target.node, timeout=timeout) as sock:
            sock.sendall(target.request_head("HEAD", {}))
            with io.BufferedReader(DeadlineReader(sock, deadline)) as reader:
                status_line = reader.readline(_STATUS_LINE_BYTES)
    except (OSError, StorageError, ValueError) as error:
        return str(error) or type(error).__name__
    if not status_line.startswith(b"HTTP/"):
        return f"no HTTP status line: {status_line[:80]!r}" if status_line else "closed without an answer"
    return None


def _writeable(device: DeviceHealth) -> bool:
    return device.status == "alive" and device.observed == "writeable" and (
        device.mb_free is None or device.mb_free >= MIN_FREE_MB)
