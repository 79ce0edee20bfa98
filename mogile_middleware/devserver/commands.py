"""The file commands of the development tracker, answering as mogilefsd 2.73 does.

create_open / create_close, get_paths, file_info, file_debug, delete, rename, updateclass,
list_keys and list_fids: validation order, error codes and reply fields follow the real
tracker. Replication and the deletion of dropped data are synchronous unless the tracker has a
replication delay (see :class:`~.replication.BackgroundWork`).
"""

from __future__ import annotations

import random
import re
import time

from ..protocol import MAX_KEY_BYTES
from . import httpstore
from .dispatch import CommandError, Context, Handler, Reply, perl_int, perl_true, require_domain
from .metadata import DeviceRow, FileRow

_CHECKSUM = re.compile(r"\AMD5:[0-9a-fA-F]{32}\Z")


def _pick_devices(ctx: Context, count: int) -> list[DeviceRow]:
    """Up to ``count`` random live devices, no two on the same host."""
    live = ctx.monitor.live_devices()
    random.shuffle(live)
    picked: list[DeviceRow] = []
    for device in live:
        if len(picked) < count and all(device.hostid != other.hostid for other in picked):
            picked.append(device)
    return picked


def _device_map(ctx: Context) -> dict[int, DeviceRow]:
    return {device.devid: device for device in ctx.store.devices()}


def _file_for_key(ctx: Context, args: dict[str, str], key_arg: str = "key") -> FileRow:
    dmid = require_domain(ctx, args)
    key = args.get(key_arg)
    if not key:
        raise CommandError("no_key")
    row = ctx.store.file_by_key(dmid, key)
    if row is None:
        raise CommandError("unknown_key")
    return row


def create_open(ctx: Context, args: dict[str, str]) -> Reply:
    """Hand out a fid and the device path(s) to PUT the data to (3 hosts at most with multi_dest)."""
    dmid = require_domain(ctx, args)
    key = args["key"] if perl_true(args.get("key")) else ""
    multi = perl_true(args.get("multi_dest"))
    classid = 0
    if perl_true(args.get("class")):
        cls = ctx.store.class_by_name(dmid, args["class"])
        if cls is None or cls.classid == 0:  # mogilefsd's "->id or return err_line": default is asked by no name
            raise CommandError("unreg_class")
        classid = cls.classid
    dests = _pick_devices(ctx, 3 if multi else 1)
    if not dests:
        raise CommandError("no_devices")
    wanted = perl_int(args["fid"]) if perl_true(args.get("fid")) else None
    fid = ctx.store.open_tempfile(dmid, key, classid, [device.devid for device in dests], wanted)
    if fid is None:
        raise CommandError("fid_in_use")
    if not multi:
        return {"fid": fid, "devid": dests[0].devid, "path": dests[0].url_for(fid)}
    reply: dict[str, str | int] = {"dev_count": len(dests), "fid": fid}
    for number, device in enumerate(dests, 1):
        reply[f"devid_{number}"] = device.devid
        reply[f"path_{number}"] = device.url_for(fid)
    return reply


def create_close(ctx: Context, args: dict[str, str]) -> Reply:
    """Check the upload, point the key at it, replicate it to mindevcount and delete the data it replaced.

    Once the tempfile is taken, every failure deletes the upload: no key points at it. The copies
    and the deletion are made before answering, or after the replication delay if there is one.
    """
    dmid = require_domain(ctx, args)
    for name in ("fid", "devid", "path"):
        if not perl_true(args.get(name)):
            raise CommandError(f"no_{name}")
    fid, devid, path = perl_int(args["fid"]), perl_int(args["devid"]), args["path"]
    checksum = args["checksum"] if perl_true(args.get("checksum")) else ""  # "0" is Perl's false: none
    if checksum and not _CHECKSUM.match(checksum):
        raise CommandError("invalid_checksum_format")
    checksum = checksum.lower().replace("md5:", "MD5:")
    device = _device_map(ctx).get(devid)
    if device is None or path != device.url_for(fid):
        raise CommandError("bogus_args")
    temp = ctx.store.take_tempfile(fid)
    if temp is None:
        raise CommandError("no_temp_file")

    def fail(code: str, text: str) -> CommandError:
        httpstore.delete(path)
        return CommandError(code, text)

    if str(devid) not in temp.devids.split(","):
        raise fail(
            "invalid_destdev", f"File uploaded to invalid dest {args['devid']}. Valid devices were: {temp.devids}"
        )
    key = args.get("key")
    if not key:  # closing without a key means: discard the upload
        httpstore.delete(path)
        return None
    size = httpstore.head_size(path)
    expected = args["size"] if perl_true(args.get("size")) else "-1"
    if size is None or size < 0:
        state, error = ("cantreach", "storage node unreachable") if size is None else ("missing", "HTTP 404")
        raise fail("size_verify_error", f"Expected: {expected}; actual: 0 ({state}); path: {path}; error: {error}")
    if perl_int(expected) > -1 and perl_int(expected) != size:
        raise fail("size_mismatch", f"Expected: {expected}; actual: {size}; path: {path}")
    if checksum and perl_true(args.get("checksumverify")):
        actual = f"MD5:{httpstore.md5_hex(path)}"
        if actual != checksum:
            expected_checksum = f"Checksum[f={fid};{checksum.replace(':', '=', 1)}]"  # as Perl prints the object
            raise fail("checksum_mismatch", f"Expected: {expected_checksum}; actual: {actual}; path: {path}")
    if ctx.overwrite_gap:
        _drop_overwritten(ctx, dmid, key)
    old_fid, old_devids = ctx.store.store_file(fid, dmid, key, size, temp.classid, devid)
    if old_devids:
        ctx.work.remove(ctx, old_fid, old_devids)
    if checksum and ctx.store.class_by_id(dmid, temp.classid).hashtype:
        ctx.store.set_checksum(fid, "MD5", checksum[4:])
    ctx.work.replicate(ctx, fid)
    return None


def _drop_overwritten(ctx: Context, dmid: int, key: str) -> None:
    """Drop the file ``key`` names, then wait: mogilefsd drops it and records the new one in
    separate statements, so another client may find the key unknown in between."""
    old = ctx.store.file_by_key(dmid, key)
    if old is not None:
        ctx.work.remove(ctx, old.fid, ctx.store.delete_file(old.fid))
        time.sleep(ctx.overwrite_gap)


def get_paths(ctx: Context, args: dict[str, str]) -> Reply:
    """The URLs of a key's readable copies in random order, draining devices last.

    The first one is size-checked unless ``noverify``; with no readable copy, an unreadable one.
    """
    row = _file_for_key(ctx, args)
    pathcount = max(perl_int(args.get("pathcount")) or 2, 2)
    noverify = perl_true(args.get("noverify"))
    devices = _device_map(ctx)
    holders = [devices[devid] for devid in ctx.store.replica_devids(row.fid) if devid in devices]
    random.shuffle(holders)
    paths: list[str] = []
    draining: list[str] = []  # devices being drained may lose the file soon: their paths go last
    backup = None
    for device in holders:
        url = device.url_for(row.fid)
        if not ctx.monitor.readable(device):
            backup = url
            continue
        if not paths and not noverify and httpstore.head_size(url) != row.length:
            continue
        if device.status == "drain":
            draining.append(url)
            continue
        paths.append(url)
        if len(paths) == pathcount:
            break
    paths.extend(draining[: max(pathcount - len(paths), 0)])
    if not paths and backup:
        paths.append(backup)  # as mogilefsd: better a possibly dead path than none
    reply: dict[str, str | int] = {"paths": len(paths)}
    reply.update({f"path{number}": url for number, url in enumerate(paths, 1)})
    return reply


def file_info(ctx: Context, args: dict[str, str]) -> Reply:
    """fid, domain, class, key, length and devcount of a key (+ devids with devices=1)."""
    row = _file_for_key(ctx, args)
    domain = args["domain"]
    cls = ctx.store.class_by_id(row.dmid, row.classid)
    reply: dict[str, str | int] = {"fid": row.fid, "domain": domain, "class": cls.name}
    if cls.hashtype:
        reply["checksum"] = ctx.store.checksum(row.fid) or "MISSING"
    reply.update({"key": args["key"], "length": row.length, "devcount": row.devcount})
    if perl_true(args.get("devices")):
        reply["devids"] = ",".join(map(str, ctx.store.replica_devids(row.fid)))
    return reply


def file_debug(ctx: Context, args: dict[str, str]) -> Reply:
    """Everything known about a fid (by ``fid``, or by domain and key): file row, tempfile, copies."""
    store = ctx.store
    if perl_true(args.get("fid")):
        fid = perl_int(args["fid"])
        row = store.file_by_fid(fid)
    else:
        row = _file_for_key(ctx, args)
        fid = row.fid
    reply: dict[str, str | int] = {}
    devids = store.replica_devids(fid)
    devices = _device_map(ctx)
    reply.update({f"devpath_{devid}": devices[devid].url_for(fid) for devid in devids if devid in devices})
    if devids:
        reply["devids"] = ",".join(map(str, devids))
    reply["checksum"] = store.checksum(fid) or "NONE"
    if row is not None:
        fields: dict[str, str | int] = {
            "fid": row.fid,
            "dmid": row.dmid,
            "dkey": row.key,
            "length": row.length,
            "classid": row.classid,
            "devcount": row.devcount,
            "domain": dict(store.domains()).get(row.dmid, ""),
            "class": store.class_by_id(row.dmid, row.classid).name,
        }
        reply.update({f"fid_{name}": value for name, value in fields.items()})
    temp = store.tempfile(fid)
    if temp is not None:
        fields = {"dmid": temp.dmid, "dkey": temp.key, "classid": temp.classid, "devids": temp.devids}
        reply.update({f"tempfile_{name}": value for name, value in fields.items()})
    return reply


def delete(ctx: Context, args: dict[str, str]) -> Reply:
    """Forget a key and delete its copies from the storage nodes (at once, or after the replication delay)."""
    row = _file_for_key(ctx, args)
    ctx.work.remove(ctx, row.fid, ctx.store.delete_file(row.fid))
    return None


def rename(ctx: Context, args: dict[str, str]) -> Reply:
    """Point ``to_key`` at the file of ``from_key``; ``key_exists`` (one reply only) if it is taken."""
    require_domain(ctx, args)
    if not (args.get("from_key") and args.get("to_key")):
        raise CommandError("no_key")
    row = _file_for_key(ctx, args, "from_key")
    if not ctx.store.rename_file(row.fid, args["to_key"]):
        raise CommandError("key_exists")
    return None


def updateclass(ctx: Context, args: dict[str, str]) -> Reply:
    """Move a key to another class and replicate up to its mindevcount (at once, or after the replication delay)."""
    dmid = require_domain(ctx, args)
    if not args.get("key"):
        raise CommandError("no_key")
    if not perl_true(args.get("class")):
        raise CommandError("no_class")
    cls = ctx.store.class_by_name(dmid, args["class"])
    if cls is None:
        raise CommandError("class_not_found")
    row = ctx.store.file_by_key(dmid, args["key"])
    if row is None:
        raise CommandError("invalid_key")
    if not row.devcount:
        raise CommandError("no_devices")
    if row.classid != cls.classid:
        ctx.store.set_file_class(row.fid, cls.classid)
        ctx.work.replicate(ctx, row.fid)
    return None


def _compiles(prefix: str) -> bool:
    """Whether ``prefix`` is a valid regex (Python's syntax standing in for Perl's).

    Only prefixes as long as a key are compiled: that takes a fraction of a millisecond, while a
    64 KiB pattern takes about 0.1 s and stays in ``re``'s cache. A longer prefix matches no key.
    """
    if len(prefix) > MAX_KEY_BYTES:
        return True
    try:
        re.compile(prefix)
    except (re.error, RecursionError):  # deep nesting overflows the parser
        return False
    return True


def list_keys(ctx: Context, args: dict[str, str]) -> Reply:
    """Keys by prefix (literal, ASCII case-insensitive unless set otherwise) after ``after``, byte order, 1000 at most.

    Knowingly unlike mogilefsd, which checks ``after =~ /^$prefix/``, ``after`` must start with the
    prefix literally: matching a client's regex lets one line such as ``(a+)+$`` stall the tracker.
    A prefix that is no valid regex still fails as there, so code that breaks there breaks here.
    """
    dmid = require_domain(ctx, args)
    prefix, after = args.get("prefix") or "", args.get("after") or ""
    if prefix and perl_true(after):
        if not _compiles(prefix):
            raise CommandError("failure")
        if not after.startswith(prefix):
            raise CommandError("after_mismatch")
    limit = perl_int(args["limit"]) if perl_true(args.get("limit")) else 1000
    case_sensitive = ctx.store.server_setting("case_sensitive_list_keys") == "1"
    keys = ctx.store.list_keys(dmid, prefix, after, min(limit, 1000), case_sensitive)
    if not keys:
        raise CommandError("none_match")
    reply: dict[str, str | int] = {"key_count": len(keys), "next_after": keys[-1]}
    reply.update({f"key_{number}": key for number, key in enumerate(keys, 1)})
    return reply


def list_fids(ctx: Context, args: dict[str, str]) -> Reply:
    """Files with a fid above ``from``; ``to`` is how many (100 by default, 500 at most)."""
    count = perl_int(args.get("to")) or 100
    if count > 500 or count < 0:
        count = 500
    rows = ctx.store.list_fids(perl_int(args.get("from")), count)
    domains = dict(ctx.store.domains())
    reply: dict[str, str | int] = {"fid_count": len(rows)}
    for number, row in enumerate(rows, 1):
        fields: dict[str, str | int] = {
            "fid": row.fid,
            "domain": domains.get(row.dmid, ""),
            "class": ctx.store.class_by_id(row.dmid, row.classid).name,
            "key": row.key,
            "length": row.length,
            "devcount": row.devcount,
        }
        reply.update({f"fid_{number}_{name}": value for name, value in fields.items()})
    return reply


FILE_COMMANDS: dict[str, Handler] = {
    "create_open": create_open,
    "create_close": create_close,
    "get_paths": get_paths,
    "file_info": file_info,
    "file_debug": file_debug,
    "delete": delete,
    "rename": rename,
    "updateclass": updateclass,
    "list_keys": list_keys,
    "list_fids": list_fids,
}
