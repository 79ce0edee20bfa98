"""The namespace and maintenance commands of the development tracker: domains, classes, noop, caches.

create_domain / delete_domain, create_class / update_class / delete_class, get_domains, noop,
clear_cache and replicate_now, with mogilefsd's validation order, error codes and reply fields;
sleep, and what mogadm asks of an fsck or a rebalance, which this MogileFS never runs (their
status, answered as mogilefsd answers before any).
Every class uses the ``MultipleHosts()`` replication policy; ``hashtype`` may be ``MD5`` or
``NONE``. Hosts and devices are in :mod:`.hosts`, server settings in :mod:`.settings`.
"""

from __future__ import annotations

import time

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


def delete_domain(ctx: Context, args: dict[str, str]) -> Reply:
    """Delete a domain that has no files and no classes (a stored default class does not count)."""
    domain = args.get("domain", "")
    if not perl_true(domain):
        raise CommandError("no_domain")
    dmid = ctx.store.domain_id(domain)
    if dmid is None:
        raise CommandError("domain_not_found")
    refusal = ctx.store.delete_domain(dmid)
    if refusal is not None:
        raise CommandError(f"domain_{refusal}")
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


def delete_class(ctx: Context, args: dict[str, str]) -> Reply:
    """Delete a class that has no files (never the default class)."""
    domain, name = args.get("domain", ""), args.get("class", "")
    if not domain:
        raise CommandError("no_domain")
    if name == DEFAULT_CLASS:
        raise CommandError("nodel_default_class")
    dmid = ctx.store.domain_id(domain)
    if dmid is None:
        raise CommandError("domain_not_found")
    cls = ctx.store.class_by_name(dmid, name) if name else None
    if cls is None:
        raise CommandError("class_not_found")
    if not ctx.store.delete_class(dmid, cls.classid):
        raise CommandError("class_has_files")
    return {"domain": domain, "class": name}


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


def clear_cache(ctx: Context, args: dict[str, str]) -> Reply:
    """Answer after a monitor round (mogilefsd also reloads its caches), echoing the arguments."""
    ctx.monitor.check_all()
    return args


def replicate_now(ctx: Context, args: dict[str, str]) -> Reply:
    """Make the delayed copies now; ``count`` is the number of files that had copies to come."""
    return {"count": ctx.work.replicate_now(ctx)}


def sleep(ctx: Context, args: dict[str, str]) -> Reply:
    """Answer after ``duration`` whole seconds (10 when none or 0), as mogilefsd does: what a
    client's timeouts are tried with (``MogileFS::Client->sleep``)."""
    time.sleep(max(perl_int(args.get("duration")) or 10, 0))
    return None


def fsck_status(ctx: Context, args: dict[str, str]) -> Reply:
    """An fsck that never ran (this MogileFS has none), as mogilefsd answers before its first:
    ``mogadm fsck status`` reads it."""
    return {"running": 0, "policy_only": 0, "host": "", "start_time": 0, "stop_time": 0, "end_fid": 0,
            "max_fid_checked": 0, "max_logid": 0, "current_time": int(time.time())}


def fsck_getlog(ctx: Context, args: dict[str, str]) -> Reply:
    """No fsck log: this MogileFS checks no file."""
    return {"row_count": 0}


def fsck_clearlog(ctx: Context, args: dict[str, str]) -> Reply:
    return None


def rebalance_status(ctx: Context, args: dict[str, str]) -> Reply:
    """mogilefsd's answer with no rebalance set up, which this MogileFS never has."""
    raise CommandError("no_rebal_state", "No available rebalance status")


def rebalance_test(ctx: Context, args: dict[str, str]) -> Reply:
    raise CommandError("no_rebal_policy", "No rebalance policy available")


ADMIN_COMMANDS: dict[str, Handler] = {
    "noop": noop,
    "create_domain": create_domain,
    "delete_domain": delete_domain,
    "create_class": create_class,
    "update_class": update_class,
    "delete_class": delete_class,
    "get_domains": get_domains,
    "clear_cache": clear_cache,
    "replicate_now": replicate_now,
    "sleep": sleep,
    "fsck_status": fsck_status,
    "fsck_getlog": fsck_getlog,
    "fsck_clearlog": fsck_clearlog,
    "rebalance_status": rebalance_status,
    "rebalance_test": rebalance_test,
}
