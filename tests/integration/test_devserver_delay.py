"""The development MogileFS with a replication delay behaves as mogilefsd 2.73 was measured to.

Right after ``create_close`` a two-copy file has one copy, the second follows; the metadata of a
deleted or overwritten key changes at once while the old fid's files keep answering until the
delayed deletion. Lower bounds are asserted only when the observation was made within the delay
(which guarantees them); upper bounds are generous, every poll is bounded in time.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.devserver.metadata import MetadataStore
from mogile_middleware.devserver.tracker_server import TrackerServer
from mogile_middleware.cli import devserver as devserver_cli
from mogile_middleware.exceptions import UnknownKeyError

DELAY = 0.5
#: Generous bound for delayed work to show on a loaded machine.
PATIENCE = 5.0
POLL = 0.05

T = TypeVar("T")


@pytest.fixture
def mogile(tmp_path: Path) -> Iterator[DevMogileFS]:
    """Two storage nodes, avatar kept twice and thumb once, with a half-second replication delay."""
    with DevMogileFS(
        data_dir=tmp_path / "mogdata",
        storage_nodes=2,
        domains={"testdom": {"avatar": 2, "thumb": 1}},
        replication_delay=DELAY,
    ) as running:
        yield running


@pytest.fixture
def client(mogile: DevMogileFS) -> Iterator[Client]:
    """A client of domain ``testdom`` on the fixture's tracker."""
    mogile_client = Client("testdom", mogile.trackers)
    yield mogile_client
    mogile_client.close()


def eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = PATIENCE) -> T:
    """Poll ``probe`` every :data:`POLL` seconds until ``done`` holds of its value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"still {value!r} after {timeout} s")
        time.sleep(POLL)


def within_delay(since: float) -> bool:
    """Whether less than the delay has passed since ``since``: delayed work cannot have run yet."""
    return time.monotonic() - since < DELAY


def status(url: str) -> int:
    """The HTTP status of a GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            reply.read()
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code


def fid_files(mogile: DevMogileFS) -> list[Path]:
    """Every ``.fid`` file on the storage nodes' disks."""
    assert mogile.data_dir is not None
    return sorted(path for node in ("stor1", "stor2") for path in (mogile.data_dir / node).rglob("*.fid"))


def named(fid: int) -> str:
    """The file name of a fid's data, as in its URLs."""
    return f"{fid:010d}.fid"


def test_the_second_copy_follows_the_store(client: Client) -> None:
    started = time.monotonic()
    client.store_content("late/avatar", b"avatar-bytes", cls="avatar")
    paths, devcount = client.get_paths("late/avatar"), client.file_info("late/avatar").devcount
    if within_delay(started):
        assert (len(paths), devcount) == (1, 1)
    assert status(paths[0]) == 200
    paths = eventually(lambda: client.get_paths("late/avatar"), lambda found: len(found) == 2)
    assert len({path.split("/")[3] for path in paths}) == 2  # distinct devices
    assert all(status(path) == 200 for path in paths)
    assert client.file_info("late/avatar").devcount == 2


def test_a_one_copy_class_stays_at_one(client: Client) -> None:
    client.store_content("late/thumb", b"thumb-bytes", cls="thumb")
    time.sleep(2 * DELAY)
    assert len(client.get_paths("late/thumb")) == 1
    assert client.file_info("late/thumb").devcount == 1


def test_an_overwritten_fid_answers_until_its_delayed_deletion(client: Client) -> None:
    client.store_content("over/key", b"first", cls="avatar")
    old_paths = eventually(lambda: client.get_paths("over/key"), lambda found: len(found) == 2)
    old_fid = client.file_info("over/key").fid
    started = time.monotonic()
    client.store_content("over/key", b"second", cls="avatar")
    new_fid = client.file_info("over/key").fid
    assert new_fid != old_fid
    new_paths = client.get_paths("over/key")
    assert new_paths and all(path.endswith(named(new_fid)) for path in new_paths)
    old_statuses = [status(path) for path in old_paths]
    if within_delay(started):
        assert old_statuses == [200, 200]
    eventually(lambda: [status(path) for path in old_paths], lambda found: found == [404, 404])
    assert client.get_file_data("over/key") == b"second"


def test_a_deleted_key_is_unknown_at_once_and_its_files_go_later(client: Client) -> None:
    client.store_content("gone/key", b"doomed", cls="avatar")
    paths = eventually(lambda: client.get_paths("gone/key"), lambda found: len(found) == 2)
    started = time.monotonic()
    client.delete("gone/key")
    with pytest.raises(UnknownKeyError):
        client.get_paths("gone/key")
    statuses = [status(path) for path in paths]
    if within_delay(started):
        assert statuses == [200, 200]
    eventually(lambda: [status(path) for path in paths], lambda found: found == [404, 404])


def test_a_key_deleted_before_its_copies_leaves_no_orphan(mogile: DevMogileFS, client: Client) -> None:
    started = time.monotonic()
    client.store_content("orphan/deleted", b"short-lived", cls="avatar")
    fid = client.file_info("orphan/deleted").fid
    client.delete("orphan/deleted")
    if within_delay(started):
        assert [path.name for path in fid_files(mogile)] == [named(fid)]  # only the upload, for now
    eventually(lambda: fid_files(mogile), lambda found: found == [])
    time.sleep(2 * DELAY)  # the replication was due before the deletion; nothing comes after it
    assert fid_files(mogile) == []


def test_a_key_overwritten_before_its_copies_leaves_no_orphan(mogile: DevMogileFS, client: Client) -> None:
    client.store_content("orphan/over", b"first", cls="avatar")
    old_fid = client.file_info("orphan/over").fid
    client.store_content("orphan/over", b"second", cls="avatar")
    new_fid = client.file_info("orphan/over").fid
    eventually(lambda: sorted(path.name for path in fid_files(mogile)), lambda found: found == [named(new_fid)] * 2)
    time.sleep(2 * DELAY)
    assert named(old_fid) not in {path.name for path in fid_files(mogile)}
    assert len(fid_files(mogile)) == 2


def test_updateclass_to_more_copies_replicates_later(client: Client) -> None:
    client.store_content("moved/key", b"promoted", cls="thumb")
    time.sleep(2 * DELAY)
    assert client.file_info("moved/key").devcount == 1
    started = time.monotonic()
    client.update_class("moved/key", "avatar")
    devcount = client.file_info("moved/key").devcount
    if within_delay(started):
        assert devcount == 1
    eventually(lambda: client.file_info("moved/key").devcount, lambda count: count == 2)
    paths = client.get_paths("moved/key")
    assert len(paths) == 2 and all(status(path) == 200 for path in paths)


def test_stop_drops_the_pending_work_quickly(tmp_path: Path) -> None:
    mogile = DevMogileFS(
        data_dir=tmp_path / "kept", storage_nodes=2, domains={"testdom": {"avatar": 2}}, replication_delay=60
    ).start()
    try:
        client = Client("testdom", mogile.trackers)
        client.store_content("pending/key", b"waiting", cls="avatar")
        assert client.file_info("pending/key").devcount == 1
        client.close()
    finally:
        began = time.monotonic()
        mogile.stop()
    assert time.monotonic() - began < PATIENCE


def test_command_line_option() -> None:
    parser = argparse.ArgumentParser()
    devserver_cli.add_arguments(parser)
    assert parser.parse_args([]).replication_delay == 0
    assert parser.parse_args(["--replication-delay", "1.5"]).replication_delay == 1.5
    assert parser.parse_args(["--replication-delay", "0"]).replication_delay == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--replication-delay", "-1"])
    for bad in ("-1", "-0.5", "soon", "nan", "inf"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([f"--replication-delay={bad}"])
        assert exited.value.code == 2


def test_a_negative_delay_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="negative"):
        DevMogileFS(replication_delay=-1)
    with pytest.raises(ValueError, match="negative"):
        DevMogileFS(overwrite_gap=-0.1)
    store = MetadataStore(tmp_path / "tracker.sqlite3")
    try:
        with pytest.raises(ValueError, match="negative"):  # before it could drop an overwritten file
            TrackerServer(store, overwrite_gap=-0.1)
    finally:
        store.close()
