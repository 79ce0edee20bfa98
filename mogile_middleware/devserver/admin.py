"""The administrative commands of the development tracker: domains, classes, hosts, devices.

create_domain, create_class / update_class, get_domains, get_hosts, get_devices, noop and
server_settings, with mogilefsd's validation order, error codes and reply fields. Every class
uses the ``MultipleHosts()`` replication policy; ``hashtype`` may be ``MD5`` or ``NONE``.
"""

from __future__ import annotations

from .dispatch import CommandError, Context, Handler, Reply, perl_int, perl_true
from .metadata import DEFAULT_CLASS

REPLICATION_POLICY = "MultipleHosts()"


def noop(ctx: Context, args: dict[str, str]) -> Reply:
    """Do nothing (clients use it to check a connection)."""
    return None


def create_domain(ctx: Context, args: dict[str, str]) -> Reply:
    """Create a domain."""
    domain = args.get("domain", "")
    if not perl_true(domain):
        raise CommandError("no_domain")
    if not ctx.store.create_domain(domain):
        raise CommandError("domain_exists")
    return {"domain": domain}


def create_class(ctx: Context, args: dict[str, str]) -> Reply:
    """Create a class (or change it, with ``update=1``): mindevcount, optional hashtype MD5/NONE."""
    domain, name = args.get("domain", ""), args.get("class", "")
    if not domain:
        raise CommandError("no_domain")
    if not name:
        raise CommandError("no_class")
    mindevcount = perl_int(args.get("mindevcount"))
    if mindevcount < 1:
        raise CommandError("invalid_mindevcount")
    policy = args.get("replpolicy")
    if perl_true(policy) and policy != REPLICATION_POLICY:
        raise CommandError("invalid_replpolicy", f"only {REPLICATION_POLICY} is supported")
    hashtype = args.get("hashtype")
    if perl_true(hashtype) and hashtype not in ("MD5", "NONE"):
        raise CommandError("invalid_hashtype")
    dmid = ctx.store.domain_id(domain)
    if dmid is None:
        raise CommandError("domain_not_found")
    stored_hashtype = "MD5" if hashtype == "MD5" else None
    if perl_true(args.get("update")):
        if ctx.store.class_by_name(dmid, name) is None:
            raise CommandError("class_not_found")
        if name == DEFAULT_CLASS:  # the implicit default class gets a row of its own
            ctx.store.create_class(dmid, name, mindevcount, stored_hashtype)
    elif not ctx.store.create_class(dmid, name, mindevcount, stored_hashtype):
        raise CommandError("class_exists")
    cls = ctx.store.class_by_name(dmid, name)
    if cls is None:
        raise CommandError("class_not_found")
    ctx.store.update_class(dmid, cls.classid, mindevcount, stored_hashtype, perl_true(hashtype))
    return {"class": name, "mindevcount": mindevcount, "domain": domain}


def update_class(ctx: Context, args: dict[str, str]) -> Reply:
    """``create_class`` with ``update=1``."""
    return create_class(ctx, {**args, "update": "1"})


def get_domains(ctx: Context, args: dict[str, str]) -> Reply:
    """Every domain with its classes (the default class included)."""
    reply: dict[str, str | int] = {"domains": 0}
    for number, (dmid, name) in enumerate(ctx.store.domains(), 1):
        reply["domains"] = number
        reply[f"domain{number}"] = name
        classes = ctx.store.classes(dmid)
        for index, cls in enumerate(classes, 1):
            prefix = f"domain{number}class{index}"
            reply[f"{prefix}name"] = cls.name
            reply[f"{prefix}mindevcount"] = cls.mindevcount
            reply[f"{prefix}replpolicy"] = REPLICATION_POLICY
            reply[f"{prefix}hashtype"] = cls.hashtype or "NONE"
        reply[f"domain{number}classes"] = len(classes)
    return reply


def get_hosts(ctx: Context, args: dict[str, str]) -> Reply:
    """Every storage host (``hostid=N`` for one)."""
    hosts = [host for host in ctx.store.hosts() if "hostid" not in args or host["hostid"] == perl_int(args["hostid"])]
    reply: dict[str, str | int] = {"hosts": len(hosts)}
    for number, host in enumerate(hosts, 1):
        fields = {**host, "http_get_port": "", "altip": "", "altmask": ""}
        reply.update({f"host{number}_{name}": value for name, value in fields.items()})
    return reply


def get_devices(ctx: Context, args: dict[str, str]) -> Reply:
    """Every device (``devid=N`` for one) with its observed state; disk figures are not collected."""
    devices = [dev for dev in ctx.store.devices() if "devid" not in args or dev.devid == perl_int(args["devid"])]
    reply: dict[str, str | int] = {"devices": len(devices)}
    for number, device in enumerate(devices, 1):
        fields: dict[str, str | int] = {
            "devid": device.devid,
            "hostid": device.hostid,
            "status": device.status,
            "observed_state": "writeable" if ctx.monitor.is_up(device) else "unreachable",
            "weight": device.weight,
            "reject_bad_md5": 1,
        }
        fields.update(dict.fromkeys(("mb_total", "mb_used", "mb_free", "mb_asof", "utilization"), ""))
        reply.update({f"dev{number}_{name}": value for name, value in fields.items()})
    return reply


def server_settings(ctx: Context, args: dict[str, str]) -> Reply:
    """The server settings, as ``key_N`` / ``value_N``."""
    settings = ctx.store.server_settings()
    reply: dict[str, str | int] = {"key_count": len(settings)}
    for number, (name, value) in enumerate(settings, 1):
        reply[f"key_{number}"] = name
        reply[f"value_{number}"] = value
    return reply


ADMIN_COMMANDS: dict[str, Handler] = {
    "noop": noop,
    "create_domain": create_domain,
    "create_class": create_class,
    "update_class": update_class,
    "get_domains": get_domains,
    "get_hosts": get_hosts,
    "get_devices": get_devices,
    "server_settings": server_settings,
}
