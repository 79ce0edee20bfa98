"""SQLite metadata of the development tracker: domains, classes, hosts, devices, files, replicas.

One connection guarded by a lock, so every tracker thread can use it; the file lives in the data
directory, so stopping and starting the tracker on the same directory keeps everything. Keys and
names are stored as BLOBs of their raw bytes (as the tracker treats them), which also makes the
key order byte-wise.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..protocol import to_bytes, to_text

#: The class every domain has without creating it (classid 0), as in mogilefsd.
DEFAULT_CLASS = "default"
DEFAULT_MINDEVCOUNT = 2
#: The schema version mogilefsd 2.73 reports in ``server_settings`` (this store keeps what it needs of it).
SCHEMA_VERSION = 17

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domain (
    dmid INTEGER PRIMARY KEY, namespace BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS class (
    dmid INTEGER NOT NULL, classid INTEGER NOT NULL, classname BLOB NOT NULL,
    mindevcount INTEGER NOT NULL, hashtype TEXT,
    PRIMARY KEY (dmid, classid), UNIQUE (dmid, classname));
CREATE TABLE IF NOT EXISTS host (
    hostid INTEGER PRIMARY KEY, hostname TEXT NOT NULL UNIQUE, hostip TEXT NOT NULL,
    http_port INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'alive',
    http_get_port INTEGER, altip TEXT, altmask TEXT);
CREATE TABLE IF NOT EXISTS device (
    devid INTEGER PRIMARY KEY, hostid INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'alive',
    weight INTEGER NOT NULL DEFAULT 100);
CREATE TABLE IF NOT EXISTS file (
    fid INTEGER PRIMARY KEY, dmid INTEGER NOT NULL, dkey BLOB NOT NULL, length INTEGER NOT NULL,
    classid INTEGER NOT NULL, UNIQUE (dmid, dkey));
CREATE TABLE IF NOT EXISTS file_on (
    fid INTEGER NOT NULL, devid INTEGER NOT NULL, PRIMARY KEY (fid, devid));
CREATE TABLE IF NOT EXISTS tempfile (
    fid INTEGER PRIMARY KEY AUTOINCREMENT, createtime INTEGER NOT NULL, dmid INTEGER NOT NULL,
    dkey BLOB NOT NULL, classid INTEGER NOT NULL, devids TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checksum (
    fid INTEGER PRIMARY KEY, hashtype TEXT NOT NULL, checksum TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS server_settings (field TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: Columns added to table ``host`` since the first version of this store (added on open).
_ADDED_HOST_COLUMNS = {"http_get_port": "INTEGER", "altip": "TEXT", "altmask": "TEXT"}


def fid_path(devid: int, fid: int) -> str:
    """The path of a fid on a device, as mogilefsd builds it: ``/dev1/0/000/000/0000000123.fid``."""
    digits = f"{fid:010d}"
    return f"/dev{devid}/{digits[0]}/{digits[1:4]}/{digits[4:7]}/{digits}.fid"


@dataclass(frozen=True)
class ClassRow:
    """A storage class of a domain; ``hashtype`` is ``"MD5"`` or ``None``."""

    dmid: int
    classid: int
    name: str
    mindevcount: int
    hashtype: str | None


@dataclass(frozen=True)
class HostRow:
    """A storage host as ``get_hosts`` reports it; the optional fields are ``None`` when unset."""

    hostid: int
    hostname: str
    hostip: str
    http_port: int
    status: str
    http_get_port: int | None
    altip: str | None
    altmask: str | None


@dataclass(frozen=True)
class DeviceRow:
    """A device and the host (storage node) that serves it over HTTP, with both their states."""

    devid: int
    hostid: int
    hostname: str
    hostip: str
    http_port: int
    status: str
    weight: int
    host_status: str

    @property
    def base_url(self) -> str:
        """The storage node's URL, ``http://IP:PORT``."""
        return f"http://{self.hostip}:{self.http_port}"

    def url_for(self, fid: int) -> str:
        """The URL of ``fid`` on this device."""
        return self.base_url + fid_path(self.devid, fid)


@dataclass(frozen=True)
class FileRow:
    """A stored key and the fid holding its data; ``devcount`` counts its replicas."""

    fid: int
    dmid: int
    key: str
    length: int
    classid: int
    devcount: int


@dataclass(frozen=True)
class TempfileRow:
    """A fid handed out by ``create_open`` and not closed yet; ``devids`` as sent, ``"1,2"``."""

    fid: int
    dmid: int
    key: str
    classid: int
    devids: str


_HOST_COLUMNS = "hostid, hostname, hostip, http_port, status, http_get_port, altip, altmask"
_UPDATABLE_HOST_COLUMNS = ("status", "hostip", "http_port", "http_get_port", "altip", "altmask")
_FILE_COLUMNS = "f.fid, f.dmid, f.dkey, f.length, f.classid, (SELECT COUNT(*) FROM file_on o WHERE o.fid = f.fid)"


def _file_row(row: tuple[int, int, bytes, int, int, int]) -> FileRow:
    return FileRow(row[0], row[1], to_text(row[2]), row[3], row[4], row[5])


class MetadataStore:
    """The tracker's database; every method is one short, thread-safe transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._tx() as db:
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(host)")}
            for name, kind in _ADDED_HOST_COLUMNS.items():
                if name not in columns:
                    db.execute(f"ALTER TABLE host ADD COLUMN {name} {kind}")
            db.execute(
                "REPLACE INTO server_settings (field, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # -- domains and classes ------------------------------------------------------------------

    def domain_id(self, name: str) -> int | None:
        """The dmid of a domain, or ``None``."""
        with self._tx() as db:
            row = db.execute("SELECT dmid FROM domain WHERE namespace = ?", (to_bytes(name),)).fetchone()
        return row[0] if row else None

    def domains(self) -> list[tuple[int, str]]:
        """Every domain as ``(dmid, name)``."""
        with self._tx() as db:
            rows = db.execute("SELECT dmid, namespace FROM domain ORDER BY dmid").fetchall()
        return [(dmid, to_text(name)) for dmid, name in rows]

    def create_domain(self, name: str) -> bool:
        """Create a domain; ``False`` when it already exists."""
        with self._tx() as db:
            cursor = db.execute("INSERT OR IGNORE INTO domain (namespace) VALUES (?)", (to_bytes(name),))
        return cursor.rowcount == 1

    def classes(self, dmid: int) -> list[ClassRow]:
        """The classes of a domain, the default class first (implicit unless it was created)."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT classid, classname, mindevcount, hashtype FROM class WHERE dmid = ? ORDER BY classid", (dmid,)
            ).fetchall()
        classes = [ClassRow(dmid, cid, to_text(name), mdc, hashtype) for cid, name, mdc, hashtype in rows]
        if not classes or classes[0].classid != 0:
            classes.insert(0, ClassRow(dmid, 0, DEFAULT_CLASS, DEFAULT_MINDEVCOUNT, None))
        return classes

    def class_by_name(self, dmid: int, name: str) -> ClassRow | None:
        """A class of a domain by name (``default`` always exists)."""
        return next((cls for cls in self.classes(dmid) if cls.name == name), None)

    def class_by_id(self, dmid: int, classid: int) -> ClassRow:
        """A class of a domain by id; an unknown id reads as the default class."""
        classes = self.classes(dmid)
        return next((cls for cls in classes if cls.classid == classid), classes[0])

    def create_class(self, dmid: int, name: str, mindevcount: int, hashtype: str | None) -> bool:
        """Create a class (``default`` takes classid 0); ``False`` when it already exists."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM class WHERE dmid = ? AND classname = ?", (dmid, to_bytes(name))).fetchone():
                return False
            if name == DEFAULT_CLASS:
                classid = 0
            else:
                (top,) = db.execute("SELECT COALESCE(MAX(classid), 0) FROM class WHERE dmid = ?", (dmid,)).fetchone()
                classid = top + 1
            db.execute(
                "INSERT INTO class (dmid, classid, classname, mindevcount, hashtype) VALUES (?, ?, ?, ?, ?)",
                (dmid, classid, to_bytes(name), mindevcount, hashtype),
            )
        return True

    def delete_domain(self, dmid: int) -> str | None:
        """Delete a domain (and its stored default class); ``"has_files"`` / ``"has_classes"`` if it may not."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM file WHERE dmid = ? LIMIT 1", (dmid,)).fetchone():
                return "has_files"
            if db.execute("SELECT 1 FROM class WHERE dmid = ? AND classid != 0 LIMIT 1", (dmid,)).fetchone():
                return "has_classes"
            db.execute("DELETE FROM domain WHERE dmid = ?", (dmid,))
            db.execute("DELETE FROM class WHERE dmid = ?", (dmid,))
        return None

    def delete_class(self, dmid: int, classid: int) -> bool:
        """Delete a class; ``False`` while files of it exist."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM file WHERE dmid = ? AND classid = ? LIMIT 1", (dmid, classid)).fetchone():
                return False
            db.execute("DELETE FROM class WHERE dmid = ? AND classid = ?", (dmid, classid))
        return True

    def update_class(self, dmid: int, classid: int, mindevcount: int, hashtype: str | None, set_hashtype: bool) -> None:
        """Change a class's mindevcount (and hashtype when ``set_hashtype``)."""
        with self._tx() as db:
            db.execute(
                "UPDATE class SET mindevcount = ?, hashtype = CASE WHEN ? THEN ? ELSE hashtype END"
                " WHERE dmid = ? AND classid = ?",
                (mindevcount, set_hashtype, hashtype, dmid, classid),
            )

    # -- hosts and devices --------------------------------------------------------------------

    def register_device(self, devid: int, hostname: str, hostip: str, http_port: int) -> None:
        """Add or update a device and its host (the storage node at ``http://hostip:http_port``)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO host (hostname, hostip, http_port) VALUES (?, ?, ?)"
                " ON CONFLICT (hostname) DO UPDATE SET hostip = excluded.hostip, http_port = excluded.http_port",
                (hostname, hostip, http_port),
            )
            (hostid,) = db.execute("SELECT hostid FROM host WHERE hostname = ?", (hostname,)).fetchone()
            db.execute(
                "INSERT INTO device (devid, hostid) VALUES (?, ?)"
                " ON CONFLICT (devid) DO UPDATE SET hostid = excluded.hostid",
                (devid, hostid),
            )

    def devices(self) -> list[DeviceRow]:
        """Every device with its host, by devid."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT d.devid, d.hostid, h.hostname, h.hostip, h.http_port, d.status, d.weight, h.status"
                " FROM device d JOIN host h ON h.hostid = d.hostid ORDER BY d.devid"
            ).fetchall()
        return [DeviceRow(*row) for row in rows]

    def device(self, devid: int) -> DeviceRow | None:
        """A device by devid."""
        return next((device for device in self.devices() if device.devid == devid), None)

    def hosts(self) -> list[HostRow]:
        """Every host, by hostid."""
        with self._tx() as db:
            rows = db.execute(f"SELECT {_HOST_COLUMNS} FROM host ORDER BY hostid").fetchall()
        return [HostRow(*row) for row in rows]

    def host_by_name(self, hostname: str) -> HostRow | None:
        """A host by name."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_HOST_COLUMNS} FROM host WHERE hostname = ?", (hostname,)).fetchone()
        return HostRow(*row) if row else None

    def create_host(self, hostname: str, hostip: str) -> int:
        """Add a host (status ``down``, port 7500 until updated); returns its hostid."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO host (hostname, hostip, http_port, status) VALUES (?, ?, 7500, 'down')", (hostname, hostip)
            )
        return cursor.lastrowid or 0

    def update_host(self, hostid: int, fields: dict[str, str]) -> None:
        """Set some of a host's ``status``, ``hostip``, ``http_port``, ``http_get_port``, ``altip``, ``altmask``."""
        names = [name for name in _UPDATABLE_HOST_COLUMNS if name in fields]
        if not names:
            return
        with self._tx() as db:
            assignments = ", ".join(f"{name} = ?" for name in names)
            db.execute(f"UPDATE host SET {assignments} WHERE hostid = ?", [*(fields[name] for name in names), hostid])

    def delete_host(self, hostid: int) -> None:
        """Remove a host (the caller has checked that it holds no device)."""
        with self._tx() as db:
            db.execute("DELETE FROM host WHERE hostid = ?", (hostid,))

    def create_device(self, devid: int, hostid: int, status: str) -> bool:
        """Add a device to a host (weight 100); ``False`` when the devid is taken."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO device (devid, hostid, status) VALUES (?, ?, ?)", (devid, hostid, status)
            )
        return cursor.rowcount == 1

    def set_device_state(self, devid: int, status: str) -> None:
        """Change a device's administrative state."""
        with self._tx() as db:
            db.execute("UPDATE device SET status = ? WHERE devid = ?", (status, devid))

    def drop_device_replicas(self, devid: int) -> list[int]:
        """Forget every copy on a device (marked dead: its files are lost); returns the fids it held."""
        with self._tx() as db:
            fids = [fid for (fid,) in db.execute("SELECT fid FROM file_on WHERE devid = ? ORDER BY fid", (devid,))]
            db.execute("DELETE FROM file_on WHERE devid = ?", (devid,))
        return fids

    def set_device_weight(self, devid: int, weight: int) -> None:
        """Change a device's weight."""
        with self._tx() as db:
            db.execute("UPDATE device SET weight = ? WHERE devid = ?", (weight, devid))

    # -- tempfiles ----------------------------------------------------------------------------

    def open_tempfile(self, dmid: int, key: str, classid: int, devids: list[int], fid: int | None = None) -> int | None:
        """Hand out the next fid (or ``fid``) for an upload; ``None`` when ``fid`` is taken (by an
        upload or a file) or is not above 0, as mogilefsd answers ``fid_in_use``."""
        try:
            with self._tx() as db:
                if fid is not None and (fid <= 0 or db.execute("SELECT 1 FROM file WHERE fid = ?", (fid,)).fetchone()):
                    return None
                cursor = db.execute(
                    "INSERT INTO tempfile (fid, createtime, dmid, dkey, classid, devids) VALUES (?, ?, ?, ?, ?, ?)",
                    (fid, int(time.time()), dmid, to_bytes(key), classid, ",".join(map(str, devids))),
                )
        except sqlite3.IntegrityError:
            return None
        return cursor.lastrowid

    def tempfile(self, fid: int) -> TempfileRow | None:
        """An open tempfile by fid."""
        with self._tx() as db:
            row = db.execute("SELECT fid, dmid, dkey, classid, devids FROM tempfile WHERE fid = ?", (fid,)).fetchone()
        return TempfileRow(row[0], row[1], to_text(row[2]), row[3], row[4]) if row else None

    def take_tempfile(self, fid: int) -> TempfileRow | None:
        """Remove and return an open tempfile (so a second close of the same fid finds nothing)."""
        row = self.tempfile(fid)
        with self._tx() as db:
            taken = db.execute("DELETE FROM tempfile WHERE fid = ?", (fid,)).rowcount
        return row if taken else None

    # -- files and replicas -------------------------------------------------------------------

    def file_by_key(self, dmid: int, key: str) -> FileRow | None:
        """The file a key points at."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM file f WHERE f.dmid = ? AND f.dkey = ?", (dmid, to_bytes(key))
            ).fetchone()
        return _file_row(row) if row else None

    def file_by_fid(self, fid: int) -> FileRow | None:
        """A file by fid."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_FILE_COLUMNS} FROM file f WHERE f.fid = ?", (fid,)).fetchone()
        return _file_row(row) if row else None

    def store_file(self, fid: int, dmid: int, key: str, length: int, classid: int, devid: int) -> tuple[int, list[int]]:
        """Point ``key`` at ``fid`` (held on ``devid``); returns the fid it replaced (0 if none) and its devids.

        The replaced fid's rows are gone when this returns; its data is the caller's to delete.
        """
        with self._tx() as db:
            old = db.execute("SELECT fid FROM file WHERE dmid = ? AND dkey = ?", (dmid, to_bytes(key))).fetchone()
            old_fid = old[0] if old else 0
            old_devids = _delete_fid(db, old_fid) if old else []
            db.execute(
                "INSERT INTO file (fid, dmid, dkey, length, classid) VALUES (?, ?, ?, ?, ?)",
                (fid, dmid, to_bytes(key), length, classid),
            )
            db.execute("INSERT OR IGNORE INTO file_on (fid, devid) VALUES (?, ?)", (fid, devid))
        return old_fid, old_devids

    def delete_file(self, fid: int) -> list[int]:
        """Forget a file; returns the devids that held it (their data is the caller's to delete)."""
        with self._tx() as db:
            return _delete_fid(db, fid)

    def rename_file(self, fid: int, new_key: str) -> bool:
        """Point another key at a file; ``False`` when the new key is taken by another file."""
        try:
            with self._tx() as db:
                db.execute("UPDATE file SET dkey = ? WHERE fid = ?", (to_bytes(new_key), fid))
        except sqlite3.IntegrityError:
            return False
        return True

    def set_file_class(self, fid: int, classid: int) -> None:
        """Move a file to another class."""
        with self._tx() as db:
            db.execute("UPDATE file SET classid = ? WHERE fid = ?", (classid, fid))

    def replica_devids(self, fid: int) -> list[int]:
        """The devices holding a copy of ``fid``."""
        with self._tx() as db:
            rows = db.execute("SELECT devid FROM file_on WHERE fid = ? ORDER BY devid", (fid,)).fetchall()
        return [devid for (devid,) in rows]

    def add_replica(self, fid: int, devid: int) -> bool:
        """Record a copy of ``fid`` on ``devid``; ``False`` when the file no longer exists."""
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM file WHERE fid = ?", (fid,)).fetchone():
                return False
            db.execute("INSERT OR IGNORE INTO file_on (fid, devid) VALUES (?, ?)", (fid, devid))
        return True

    def remove_replica(self, fid: int, devid: int) -> None:
        """Forget the copy of ``fid`` on ``devid`` (one more than its class keeps)."""
        with self._tx() as db:
            db.execute("DELETE FROM file_on WHERE fid = ? AND devid = ?", (fid, devid))

    def under_replicated(self) -> list[int]:
        """The fids with fewer copies than their class's mindevcount."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT f.fid FROM file f LEFT JOIN class c ON c.dmid = f.dmid AND c.classid = f.classid"
                " WHERE (SELECT COUNT(*) FROM file_on o WHERE o.fid = f.fid) < COALESCE(c.mindevcount, ?)"
                " ORDER BY f.fid",
                (DEFAULT_MINDEVCOUNT,),
            ).fetchall()
        return [fid for (fid,) in rows]

    def list_keys(self, dmid: int, prefix: str, after: str, limit: int, case_sensitive: bool = False) -> list[str]:
        """Keys starting with ``prefix`` above ``after``, in byte order.

        The prefix matches ASCII case-insensitively, as SQLite's LIKE does for mogilefsd, unless
        ``case_sensitive`` (its ``case_sensitive_list_keys`` setting).
        """
        pattern = to_bytes(prefix).replace(b"\\", b"\\\\").replace(b"%", b"\\%").replace(b"_", b"\\_") + b"%"
        with self._tx() as db:
            db.execute(f"PRAGMA case_sensitive_like = {'ON' if case_sensitive else 'OFF'}")
            rows = db.execute(
                "SELECT dkey FROM file WHERE dmid = ? AND CAST(dkey AS TEXT) LIKE CAST(? AS TEXT) ESCAPE '\\'"
                " AND dkey > ? ORDER BY dkey LIMIT ?",
                (dmid, pattern, to_bytes(after), limit),
            ).fetchall()
        return [to_text(key) for (key,) in rows]

    def list_fids(self, after_fid: int, count: int) -> list[FileRow]:
        """Up to ``count`` files with a fid above ``after_fid``, by fid."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM file f WHERE f.fid > ? ORDER BY f.fid LIMIT ?", (after_fid, count)
            ).fetchall()
        return [_file_row(row) for row in rows]

    # -- checksums and settings ---------------------------------------------------------------

    def checksum(self, fid: int) -> str | None:
        """The stored checksum of a fid as ``MD5:<hex>``."""
        with self._tx() as db:
            row = db.execute("SELECT hashtype, checksum FROM checksum WHERE fid = ?", (fid,)).fetchone()
        return f"{row[0]}:{row[1]}" if row else None

    def set_checksum(self, fid: int, hashtype: str, hexdigest: str) -> None:
        """Store the checksum of a fid."""
        with self._tx() as db:
            db.execute("REPLACE INTO checksum (fid, hashtype, checksum) VALUES (?, ?, ?)", (fid, hashtype, hexdigest))

    def server_settings(self) -> list[tuple[str, str]]:
        """Every server setting as ``(name, value)``."""
        with self._tx() as db:
            return db.execute("SELECT field, value FROM server_settings ORDER BY field").fetchall()

    def server_setting(self, name: str) -> str | None:
        """One server setting's value."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM server_settings WHERE field = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_server_setting(self, name: str, value: str | None) -> None:
        """Store a server setting; ``None`` removes it."""
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM server_settings WHERE field = ?", (name,))
            else:
                db.execute("REPLACE INTO server_settings (field, value) VALUES (?, ?)", (name, value))

    def increment_server_setting(self, name: str) -> None:
        """Add one to a numeric server setting (1 when unset)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO server_settings (field, value) VALUES (?, '1')"
                " ON CONFLICT (field) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
                (name,),
            )


def _delete_fid(db: sqlite3.Connection, fid: int) -> list[int]:
    devids = [devid for (devid,) in db.execute("SELECT devid FROM file_on WHERE fid = ?", (fid,))]
    for table in ("file", "file_on", "checksum"):
        db.execute(f"DELETE FROM {table} WHERE fid = ?", (fid,))
    return devids
