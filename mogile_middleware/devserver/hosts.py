"""The host and device commands of the development tracker, answering as mogilefsd 2.73 does.

get_hosts, create_host / update_host / delete_host, get_devices, create_device, set_state and
set_weight: validation order, error codes and reply fields follow the real tracker. A host's
address is only used to reach its storage node over HTTP; ``http_get_port``, ``altip`` and
``altmask`` are stored and reported, not used. Commands that change hosts or devices answer
after a monitor round, as mogilefsd's do (they end with its ``clear_cache``), so the next
``get_devices`` shows what the change means.
"""

from __future__ import annotations

import re

from .dispatch import CommandError, Context, Handler, Reply, perl_int, perl_true
from .states import DEVICE_STATES, HOST_STATES

#: Request arguments of create_host / update_host and the host fields they set.
_HOST_FIELDS = {
    "status": "status",
    "ip": "hostip",
    "port": "http_port",
    "getport": "http_get_port",
    "altip": "altip",
    "altmask": "altmask",
}
_DIGITS = re.compile(r"\d+")


def _after_monitor_round(ctx: Context, reply: Reply) -> Reply:
    """``reply``, once the monitor has looked at every device again (mogilefsd's ``clear_cache``)."""
    ctx.monitor.check_all()
    return reply


def get_hosts(ctx: Context, args: dict[str, str]) -> Reply:
    """Every storage host (``hostid=N`` for one)."""
    hosts = [host for host in ctx.store.hosts() if "hostid" not in args or host.hostid == perl_int(args["hostid"])]
    reply: dict[str, str | int] = {"hosts": len(hosts)}
    for number, host in enumerate(hosts, 1):
        fields = {
            "hostid": host.hostid,
            "status": host.status,
            "hostname": host.hostname,
            "hostip": host.hostip,
            "http_port": host.http_port,
            "http_get_port": host.http_get_port,
            "altip": host.altip,
            "altmask": host.altmask,
        }
        reply.update({f"host{number}_{name}": "" if value is None else value for name, value in fields.items()})
    return reply


def create_host(ctx: Context, args: dict[str, str]) -> Reply:
    """Add a host (``ip`` and ``port`` required, status ``down`` unless given), or change one with ``update=1``."""
    hostname = args.get("host")
    if not perl_true(hostname):
        raise CommandError("no_host")
    host = ctx.store.host_by_name(hostname)
    args = dict(args)
    if perl_true(args.get("update")):
        if host is None:
            raise CommandError("host_not_found")
    else:
        if host is not None:
            raise CommandError("host_exists")
        if not perl_true(args.get("ip")):
            raise CommandError("no_ip")
        if not perl_true(args.get("port")):
            raise CommandError("no_port")
        if not perl_true(args.get("status")):
            args["status"] = "down"
    if perl_true(args.get("status")) and args["status"] not in HOST_STATES:
        raise CommandError("unknown_state")
    hostid = host.hostid if host is not None else ctx.store.create_host(hostname, args["ip"])
    ctx.store.update_host(hostid, {column: args[name] for name, column in _HOST_FIELDS.items() if name in args})
    return _after_monitor_round(ctx, {"hostid": hostid, "hostname": hostname})


def update_host(ctx: Context, args: dict[str, str]) -> Reply:
    """``create_host`` with ``update=1``."""
    return create_host(ctx, {**args, "update": "1"})


def delete_host(ctx: Context, args: dict[str, str]) -> Reply:
    """Remove a host that holds no device."""
    host = ctx.store.host_by_name(args.get("host", ""))
    if host is None:
        raise CommandError("unknown_host")
    if any(device.hostid == host.hostid for device in ctx.store.devices()):
        raise CommandError("host_not_empty")
    ctx.store.delete_host(host.hostid)
    return _after_monitor_round(ctx, None)


def get_devices(ctx: Context, args: dict[str, str]) -> Reply:
    """Every device (``devid=N`` for one) with what the monitor observed: state and disk figures."""
    devices = [dev for dev in ctx.store.devices() if "devid" not in args or dev.devid == perl_int(args["devid"])]
    reply: dict[str, str | int] = {"devices": len(devices)}
    for number, device in enumerate(devices, 1):
        seen = ctx.monitor.observation(device)
        figures = seen.mb_figures()
        mb_total, mb_used = figures if figures is not None else ("", "")
        fields: dict[str, str | int] = {
            "devid": device.devid,
            "hostid": device.hostid,
            "status": device.status,
            "observed_state": seen.state,
            "weight": device.weight,
            "reject_bad_md5": 1 if seen.checked else "",
            "mb_total": mb_total,
            "mb_used": mb_used,
            "mb_free": figures[0] - figures[1] if figures is not None and figures[0] else "",
            "mb_asof": "",  # mogilefsd leaves it out of what its workers know
            "utilization": "",  # no iostat
        }
        reply.update({f"dev{number}_{name}": value for name, value in fields.items()})
    return reply


def create_device(ctx: Context, args: dict[str, str]) -> Reply:
    """Add a device (a ``devN`` directory on the host's storage node) by ``hostid`` or ``hostname``."""
    state = args.get("state") if perl_true(args.get("state")) else "alive"
    if state not in DEVICE_STATES:
        raise CommandError("invalid_state")
    devid = args.get("devid", "")
    if not (perl_true(devid) and _DIGITS.fullmatch(devid)):
        raise CommandError("invalid_devid")
    hostid = args.get("hostid", "")
    if perl_true(hostid) and _DIGITS.fullmatch(hostid):
        host = next((host for host in ctx.store.hosts() if host.hostid == int(hostid)), None)
        if host is None:
            raise CommandError("unknown_hostid")
    elif perl_true(args.get("hostname")):
        host = ctx.store.host_by_name(args["hostname"])
        if host is None:
            raise CommandError("unknown_host")
    else:
        raise CommandError("bad_args", "No hostid/hostname parameter")
    if not ctx.store.create_device(int(devid), host.hostid, state):
        raise CommandError("existing_devid")
    return _after_monitor_round(ctx, None)


def _device_of_host(ctx: Context, args: dict[str, str], valid: bool) -> int:
    """The devid of ``device`` checked against ``host``, for set_state / set_weight (``valid``: other args are)."""
    devid = perl_int(args.get("device"))
    if not (perl_true(args.get("host")) and devid and valid):
        raise CommandError("bad_params")
    device = ctx.store.device(devid)
    if device is None:
        raise CommandError("no_device")
    if device.hostname != args["host"]:
        raise CommandError("host_mismatch")
    return devid


def set_state(ctx: Context, args: dict[str, str]) -> Reply:
    """Change a device's state (alive, readonly, drain, down, dead); dead devices do not come back alive.

    A device marked dead has lost its files: its copies are forgotten and its files copied again
    from the others up to their mindevcount (mogilefsd's reaper job).
    """
    state = args.get("state", "")
    devid = _device_of_host(ctx, args, state in DEVICE_STATES)
    device = ctx.store.device(devid)
    if device is not None and device.status == "dead" and state == "alive":
        raise CommandError("state_too_high")
    ctx.store.set_device_state(devid, state)
    reply = _after_monitor_round(ctx, None)
    if state == "dead":
        for fid in ctx.store.drop_device_replicas(devid):
            ctx.work.replicate(ctx, fid)
    return reply


def set_weight(ctx: Context, args: dict[str, str]) -> Reply:
    """Change a device's weight (0 or more; a missing or non-numeric weight is 0)."""
    weight = perl_int(args.get("weight"))
    devid = _device_of_host(ctx, args, weight >= 0)
    ctx.store.set_device_weight(devid, weight)
    return _after_monitor_round(ctx, None)


HOST_COMMANDS: dict[str, Handler] = {
    "get_hosts": get_hosts,
    "create_host": create_host,
    "update_host": update_host,
    "delete_host": delete_host,
    "get_devices": get_devices,
    "create_device": create_device,
    "set_state": set_state,
    "set_weight": set_weight,
}
