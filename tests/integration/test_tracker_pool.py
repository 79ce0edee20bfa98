"""TrackerPool (and AsyncTrackerPool, through a blocking facade) over real loopback sockets against
scripted trackers: reuse, failover, faults."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import socket
import threading
import time
from collections.abc import Callable

import pytest
from conftest import DOMAIN
from integration._async_facade import Flavour, both_flavours, flavour  # noqa: F401 (a fixture)
from integration._slow_clients import node_connections
from forks import exit_code, fork_without_hooks
from wiretools import ScriptedTracker, ok

from mogile_middleware import Client, metrics
from mogile_middleware.async_tracker import AsyncTrackerPool
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.exceptions import OutcomeUnknownError, TrackerUnavailableError, UnknownKeyError
from mogile_middleware.tracker import IDLE_SECONDS, VERIFIED_BYTES_PER_SECOND, TrackerPool, parse_address, parse_trackers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tracker():
    server = ScriptedTracker(ok)
    yield server
    server.stop()


@both_flavours
def test_consecutive_requests_share_one_connection(tracker: ScriptedTracker, flavour: Flavour) -> None:
    client = flavour.Client("d", [tracker.tracker])
    for _ in range(1000):
        assert client.get_paths("k")
    assert tracker.connections == 1
    assert len(tracker.requests) == 1000


def test_threads_get_their_own_connections_and_all_replies_match(tracker: ScriptedTracker) -> None:
    tracker.script = lambda line: b"OK echo=" + line.rstrip().split(b"key=")[1] + b"\r\n"
    pool = TrackerPool([tracker.tracker])
    errors: list[str] = []

    def worker(n: int) -> None:
        for i in range(100):
            key = f"t{n}-{i}"
            reply, _ = pool.request("get_paths", {"key": key})
            if reply["echo"] != key:
                errors.append(f"{key} got {reply['echo']}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert tracker.connections <= 8


class OpenCounting(ScriptedTracker):
    """A scripted tracker that counts the connections open now."""

    def __init__(self, script: Callable[[bytes], bytes | None]) -> None:
        self.open_now = 0
        super().__init__(script)

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.open_now += 1
        try:
            super()._serve(conn)
        finally:
            with self._lock:
                self.open_now -= 1

    def open_eventually(self, count: int) -> int:
        """The connections open once they are ``count``, or after 5 s."""
        deadline = time.monotonic() + 5
        while self.open_now != count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.open_now


def test_a_bursts_connections_serve_the_next_and_close_once_unused_for_a_while() -> None:
    # 40 requests in flight at once (gevent's greenlets make hundreds), each on a connection of its
    # own. Before, all stayed open for the life of the process; then, with 16 kept at most, a steady
    # load of more threads than that opened new connections all the time (the bench's 10f).
    burst = 40
    clock = FakeClock()

    def all_at_once() -> None:
        arrived = threading.Barrier(burst)
        tracker.script = lambda line: (arrived.wait(10), ok(line))[1]
        threads = [threading.Thread(target=pool.request, args=("noop",)) for _ in range(burst)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        tracker.script = ok

    tracker = OpenCounting(ok)
    try:
        pool = TrackerPool([tracker.tracker], clock=clock)
        all_at_once()
        all_at_once()
        assert tracker.connections == burst  # the second burst on the first one's connections
        for _ in range(100):  # one at a time for twice IDLE_SECONDS: the one used last, each time
            clock.now += IDLE_SECONDS / 50
            pool.request("noop")
        assert tracker.open_eventually(1) == 1 and tracker.connections == burst
    finally:
        tracker.stop()


@both_flavours
def test_the_idle_connections_of_a_tracker_no_longer_asked_close_once_unused_for_a_while(flavour: Flavour) -> None:
    """Under asyncio too: they stayed open for good, and one a firewall dropped meanwhile was
    waited on for io_timeout, then its tracker marked dead."""
    clock = FakeClock()
    first, second = OpenCounting(ok), OpenCounting(ok)
    try:
        pool = flavour.TrackerPool([first.tracker, second.tracker], clock=clock)
        pool.mark_dead(first.address)
        assert pool.request("noop")[1] == second.address
        assert second.open_eventually(1) == 1
        clock.now += IDLE_SECONDS  # past the first one's dead time too
        assert pool.request("noop")[1] == first.address
        assert second.open_eventually(0) == 0
    finally:
        first.stop()
        second.stop()


@both_flavours
def test_a_refused_tracker_is_skipped_until_its_dead_time_passes(tracker: ScriptedTracker, flavour: Flavour) -> None:
    clock = FakeClock()
    dead_port = free_port()
    pool = flavour.TrackerPool([f"127.0.0.1:{dead_port}", tracker.tracker], dead_seconds=5, clock=clock)
    assert pool.request("noop")[1] == tracker.address
    assert pool.live_trackers() == [tracker.address]
    pool.request("noop")
    clock.now += 4.9
    assert pool.live_trackers() == [tracker.address]
    clock.now += 0.2
    assert pool.live_trackers() == [("127.0.0.1", dead_port), tracker.address]
    assert pool.request("noop")[1] == tracker.address


@both_flavours
def test_every_tracker_dead_raises_at_once_without_dialling(flavour: Flavour) -> None:
    clock = FakeClock()
    pool = flavour.TrackerPool([f"127.0.0.1:{free_port()}"], dead_seconds=5, clock=clock)
    with pytest.raises(TrackerUnavailableError, match="no tracker answered"):
        pool.request("noop")
    started = time.monotonic()
    with pytest.raises(TrackerUnavailableError, match="marked dead"):
        pool.request("noop")
    assert time.monotonic() - started < 0.5  # marked dead: no connection tried


@both_flavours
def test_whether_a_hung_tracker_is_back_is_asked_with_a_noop_within_the_connect_timeout(flavour: Flavour) -> None:
    """Every tracker hangs, as when their database does: once its dead time has passed, a tracker
    costs a request connect_timeout (a noop), not io_timeout, until it answers again."""
    clock = FakeClock()
    hung = ScriptedTracker(lambda line: b"")
    try:
        pool = flavour.TrackerPool([hung.tracker], connect_timeout=0.1, io_timeout=1.0, dead_seconds=5, clock=clock)
        started = time.monotonic()
        with pytest.raises(TrackerUnavailableError, match="no tracker answered"):
            pool.request("get_paths", {"key": "k"})
        assert 1.0 <= time.monotonic() - started < 1.8
        clock.now += 5
        started = time.monotonic()
        with pytest.raises(TrackerUnavailableError, match="still no answer"):
            pool.request("get_paths", {"key": "k"})
        assert time.monotonic() - started < 0.6
        assert hung.requests[-1] == b"noop\r\n"
        with pytest.raises(TrackerUnavailableError, match="marked dead"):  # for dead_seconds again
            pool.request("get_paths", {"key": "k"})
        hung.script = ok  # back
        clock.now += 5
        assert pool.request("get_paths", {"key": "k"})[1] == hung.address
        assert pool.request("get_paths", {"key": "k2"})[1] == hung.address
        assert [line.split()[0] for line in hung.requests[-3:]] == [b"noop", b"get_paths", b"get_paths"]
    finally:
        hung.stop()


@pytest.fixture
def named_tracker(tracker: ScriptedTracker, monkeypatch: pytest.MonkeyPatch):
    """``tracker.test:7001``, a name the resolver gives two addresses: first one whose listener's
    queue is full, so that a connect there never hears back (as from an address nothing routes),
    then ``tracker``'s."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname()):  # its one place in the queue taken
            addresses = [full.getsockname(), tracker.address]
            resolve = socket.getaddrinfo

            def resolved(host: str, port: int, *args: object, flags: int = 0, **kwargs: object) -> list[object]:
                if host != "tracker.test":
                    return resolve(host, port, *args, flags=flags, **kwargs)  # type: ignore[arg-type]
                if flags & socket.AI_NUMERICHOST:
                    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
                return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address) for address in addresses]

            monkeypatch.setattr(socket, "getaddrinfo", resolved)
            yield "tracker.test:7001"


@both_flavours
def test_each_address_of_a_tracker_name_gets_the_connect_timeout(named_tracker: str, tracker: ScriptedTracker,
                                                                 flavour: Flavour) -> None:
    """As ``socket.create_connection`` gives each: the asyncio pool gave the whole name one
    connect_timeout, so a name whose first address never answered (round robin, an IPv6 address
    nothing routes) was a 503 for good where the blocking pool reached its second address."""
    pool = flavour.TrackerPool([named_tracker], connect_timeout=0.5, io_timeout=1, dead_seconds=5)
    started = time.monotonic()
    assert pool.request("get_paths", {"key": "k"})[1] == ("tracker.test", 7001)
    assert 0.5 <= time.monotonic() - started < 1.5  # the first address was given its time
    assert pool.request("get_paths", {"key": "k"})[1] == ("tracker.test", 7001)
    assert tracker.connections == 1


def test_the_asyncio_pool_says_a_tracker_did_not_take_the_connection_in_time() -> None:
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname()):  # its one place in the queue taken
            pool = AsyncTrackerPool([full.getsockname()], connect_timeout=0.3, io_timeout=1)
            with pytest.raises(TrackerUnavailableError, match=r"127\.0\.0\.1:\d+: no connection within 0.3s"):
                asyncio.run(pool.request("noop"))


def test_the_asyncio_pool_bounds_a_names_lookup_by_the_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """And says that the name was not found in time: the tracker's host was not the one to look at."""
    resolve = socket.getaddrinfo

    def slow(host: str, *args: object, **kwargs: object) -> object:
        if host == "tracker.test" and not kwargs.get("flags", 0) & socket.AI_NUMERICHOST:  # type: ignore[operator]
            time.sleep(1.5)
        return resolve(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    pool = AsyncTrackerPool(["tracker.test:7001"], connect_timeout=0.3, io_timeout=1)

    async def failing() -> float:
        started = time.monotonic()
        with pytest.raises(TrackerUnavailableError, match=r"no address for 'tracker.test' within 0.3s"):
            await pool.request("noop")
        return time.monotonic() - started

    assert asyncio.run(failing()) < 1.2  # (asyncio.run waits for the lookup's thread to end)


@both_flavours
def test_one_of_two_trackers_failing_is_logged_once_per_outage(tracker: ScriptedTracker, flavour: Flavour,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Requests pass a failed tracker by without an error: its marking is the one sign in the log,
    named with its failure, and not repeated while it stays down; a lone tracker's failure is the
    request's own error, and logs nothing here."""
    clock = FakeClock()
    flaky = ScriptedTracker(lambda line: b"")  # accepts, never answers
    try:
        pool = flavour.TrackerPool([flaky.tracker, tracker.tracker], connect_timeout=0.1, io_timeout=0.3,
                                   dead_seconds=5, clock=clock)

        def warnings() -> list[str]:
            return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]

        with caplog.at_level("WARNING", logger="mogile_middleware"):
            assert pool.request("get_paths", {"key": "k"})[1] == tracker.address
            assert warnings() == [f"tracker {flaky.tracker} failed (timed out): not asked for 5s"]
            clock.now += 5  # asked again, still hung
            assert pool.request("get_paths", {"key": "k"})[1] == tracker.address
            assert flaky.requests[-1] == b"noop\r\n" and len(warnings()) == 1
            flaky.script = ok
            clock.now += 5
            assert pool.request("get_paths", {"key": "k"})[1] == flaky.address
            flaky.script = lambda line: b""  # down again: a new outage
            assert pool.request("get_paths", {"key": "k"})[1] == tracker.address
            assert len(warnings()) == 2
            lone = flavour.TrackerPool([f"127.0.0.1:{free_port()}"], dead_seconds=5, clock=clock)
            with pytest.raises(TrackerUnavailableError, match="no tracker answered"):
                lone.request("noop")
            assert len(warnings()) == 2
    finally:
        flaky.stop()


@both_flavours
def test_a_tracker_left_unasked_since_its_outage_is_logged_when_found_down_again(
        flavour: Flavour, caplog: pytest.LogCaptureFixture) -> None:
    """Both trackers fail, then come back; the first answers, so the second is not asked for a
    minute. When both fail again, so is the second: a new outage, logged, and not "still" down."""
    clock = FakeClock()
    first, second = ScriptedTracker(lambda line: b""), ScriptedTracker(lambda line: b"")
    try:
        pool = flavour.TrackerPool([first.tracker, second.tracker], connect_timeout=0.1, io_timeout=0.3,
                                   dead_seconds=5, clock=clock)
        with caplog.at_level("WARNING", logger="mogile_middleware"):
            with pytest.raises(TrackerUnavailableError):
                pool.request("get_paths", {"key": "k"})
            first.script = second.script = ok
            clock.now += 5
            assert pool.request("get_paths", {"key": "k"})[1] == first.address
            clock.now += 60
            first.script = second.script = lambda line: b""
            with pytest.raises(TrackerUnavailableError, match=f"{second.tracker}: no answer"):
                pool.request("get_paths", {"key": "k"})
        logged = [record.getMessage().split(" failed")[0] for record in caplog.records if record.levelname == "WARNING"]
        assert logged == [f"tracker {first.tracker}", f"tracker {second.tracker}"] * 2
    finally:
        first.stop()
        second.stop()


def slow_noop(asked: threading.Event) -> Callable[[bytes], bytes]:
    """A tracker script answering every line, a noop only after 0.5 s (``asked`` set meanwhile)."""
    def script(line: bytes) -> bytes:
        if line == b"noop\r\n":
            asked.set()
            time.sleep(0.5)
        return ok(line)
    return script


@both_flavours
@pytest.mark.parametrize("other_killed", [False, True], ids=["other alive", "other killed"])
def test_while_one_request_asks_whether_a_tracker_is_back_the_others_try_the_next_first(
        flavour: Flavour, other_killed: bool) -> None:
    """A tracker's dead time has just ended and one request asks whether it is back: another
    request goes to the other tracker at once; if that one refuses (killed), it asks the first
    one too rather than fail."""
    clock, asked = FakeClock(), threading.Event()
    returning, other = ScriptedTracker(slow_noop(asked)), ScriptedTracker(ok)
    if other_killed:
        other.stop()
    try:
        pool = flavour.TrackerPool([returning.tracker, other.tracker], connect_timeout=2, dead_seconds=5,
                                   clock=clock)
        pool.mark_dead(returning.address)
        clock.now += 5
        outcome: list[object] = []
        asking = threading.Thread(target=lambda: outcome.append(pool.request("get_paths", {"key": "k"})[1]))
        asking.start()
        assert asked.wait(5)
        started = time.monotonic()
        assert pool.request("get_paths", {"key": "k"})[1] == (returning if other_killed else other).address
        assert other_killed or time.monotonic() - started < 0.3
        asking.join(5)
        assert outcome == [returning.address]
        assert other_killed or len(returning.requests) == 2  # the noop, then the first request's get_paths
    finally:
        returning.stop()
        other.stop()


@both_flavours
def test_failover_to_a_tracker_another_request_is_asking_fails_no_request(flavour: Flavour) -> None:
    """Killing one of two trackers fails no request, though the other was marked dead long ago
    and many requests reach it while the first of them asks whether it is back."""
    clock, asked = FakeClock(), threading.Event()
    returning = ScriptedTracker(slow_noop(asked))
    try:
        pool = flavour.TrackerPool([f"127.0.0.1:{free_port()}", returning.tracker], connect_timeout=2,
                                   dead_seconds=5, clock=clock)
        pool.mark_dead(returning.address)
        clock.now += 3600
        answered: list[object] = []
        threads = [threading.Thread(target=lambda: answered.append(pool.request("get_paths", {"key": "k"})[1]))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert answered == [returning.address] * 8
    finally:
        returning.stop()


@both_flavours
def test_with_every_tracker_hung_the_requests_meanwhile_leave_the_asking_to_one(flavour: Flavour) -> None:
    """Every tracker hangs: when a tracker's dead time ends, one request asks whether it is back
    (a noop, up to connect_timeout); the requests meanwhile give up on it at once, as while it was
    marked dead (cached paths are then served at once), rather than each dial a noop of its own."""
    clock, asked = FakeClock(), threading.Event()

    def hanging(line: bytes) -> bytes:
        if line == b"noop\r\n":
            asked.set()
        return b""  # no reply, ever

    class Skips(metrics.Recorder):
        count = 0

        def tracker_skipped(self, tracker: str) -> None:
            Skips.count += 1

    hung, previous = ScriptedTracker(hanging), metrics.use(Skips())
    try:
        pool = flavour.TrackerPool([hung.tracker], connect_timeout=1.0, dead_seconds=5, clock=clock)
        pool.mark_dead(hung.address)
        clock.now += 5
        outcome: list[str] = []

        def request() -> None:
            try:
                pool.request("get_paths", {"key": "k"})
            except TrackerUnavailableError as error:
                outcome.append(str(error))

        asking = threading.Thread(target=request)
        asking.start()
        assert asked.wait(5)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(TrackerUnavailableError, match="another request is asking whether it is back"):
                pool.request("get_paths", {"key": "k"})
            assert time.monotonic() - started < 0.5  # no connect_timeout waited
        asking.join(5)
        assert len(outcome) == 1 and "still no answer" in outcome[0]
        assert hung.requests == [b"noop\r\n"]
        assert Skips.count == 3  # counted as skipped, as while it was marked dead
    finally:
        metrics.use(previous)
        hung.stop()


@both_flavours
def test_a_create_close_past_its_deadline_leaves_the_tracker_alive(flavour: Flavour) -> None:
    """mogilefsd answers create_close once it has checked the file on the storage node: a slow
    node makes it late, which says nothing of the tracker."""
    tracker = ScriptedTracker(lambda line: b"" if line.startswith(b"create_close") else ok(line))
    try:
        pool = flavour.TrackerPool([tracker.tracker], io_timeout=0.3, dead_seconds=5)
        with pytest.raises(OutcomeUnknownError, match="may or may not"):
            pool.request("create_close", {"key": "k", "fid": "1"})
        assert pool.live_trackers() == [tracker.address]
        assert pool.request("get_paths", {"key": "k"})[1] == tracker.address
    finally:
        tracker.stop()


@both_flavours
def test_a_command_unsafe_to_repeat_left_unanswered_on_a_kept_connection_marks_the_tracker_dead(
        flavour: Flavour) -> None:
    """A tracker that hangs (SIGSTOP) costs io_timeout once: a delete that waited for it on a
    kept-open connection marks it dead, so the next one goes to the other tracker at once."""
    first, second = ScriptedTracker(ok), ScriptedTracker(ok)
    try:
        pool = flavour.TrackerPool([first.tracker, second.tracker], io_timeout=1.0, dead_seconds=5)
        assert pool.request("noop")[1] == first.address  # its connection kept open
        first.script = lambda line: b""
        with pytest.raises(OutcomeUnknownError, match="may or may not"):
            pool.request("delete", {"key": "k"})
        started = time.monotonic()
        assert pool.request("delete", {"key": "k"})[1] == second.address
        assert time.monotonic() - started < 0.5  # no io_timeout waited
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("command", ["get_paths", "delete"])
def test_requests_given_up_sooner_than_io_timeout_still_mark_a_silent_tracker_dead(command: str) -> None:
    """Clients or a front proxy that give up sooner than io_timeout cancel every lookup of an
    ASGI server: the hung tracker's silence is heard all the same, so later requests go to the
    other tracker instead of each waiting for the hung one until given up."""
    silent, answering = ScriptedTracker(lambda line: b""), ScriptedTracker(ok)

    async def scenario() -> tuple[tuple[str, int], list[tuple[str, int]]]:
        pool = AsyncTrackerPool([silent.tracker, answering.tracker], io_timeout=0.3, dead_seconds=5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.request(command, {"key": "k"}), 0.05)
        await asyncio.sleep(0.4)  # past the deadline the request had
        _, tracker = await asyncio.wait_for(pool.request(command, {"key": "k"}), 0.2)
        return tracker, pool.live_trackers()

    try:
        assert asyncio.run(scenario()) == (answering.address, [answering.address])
        assert silent.connections == 1
    finally:
        silent.stop()
        answering.stop()


def test_a_tracker_that_answers_a_request_given_up_stays_alive() -> None:
    def late(line: bytes) -> bytes:
        time.sleep(0.1)
        return ok(line)

    slow = ScriptedTracker(late)

    async def scenario() -> list[tuple[str, int]]:
        pool = AsyncTrackerPool([slow.tracker], io_timeout=0.3, dead_seconds=5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.request("get_paths", {"key": "k"}), 0.05)
        await asyncio.sleep(0.4)  # past the deadline the request had
        return pool.live_trackers()

    try:
        assert asyncio.run(scenario()) == [slow.address]
    finally:
        slow.stop()


@both_flavours
def test_a_tracker_that_never_answers_costs_the_io_timeout_then_the_next_one_answers(tracker: ScriptedTracker,
                                                                                     flavour: Flavour) -> None:
    silent = ScriptedTracker(lambda line: b"")
    try:
        pool = flavour.TrackerPool([silent.tracker, tracker.tracker], io_timeout=1.0)
        started = time.monotonic()
        assert pool.request("get_paths", {"key": "k"})[1] == tracker.address
        assert 1.0 <= time.monotonic() - started < 3
        # and it is now skipped
        started = time.monotonic()
        pool.request("get_paths", {"key": "k"})
        assert time.monotonic() - started < 0.5  # no io_timeout waited
    finally:
        silent.stop()


@both_flavours
@pytest.mark.parametrize(("closes", "answered"), [(1, True), (2, True), (3, False)])
def test_a_command_safe_to_repeat_is_sent_once_more_when_a_new_connection_is_closed(
        flavour: Flavour, closes: int, answered: bool) -> None:
    """mogilefsd closes a client's connection when a worker misspeaks (its rename answers a taken
    key twice): get_paths is sent again on up to two more new connections; the tracker stays in use."""
    left = [True] * closes
    closing = ScriptedTracker(lambda line: None if left and left.pop() else ok(line))
    try:
        pool = flavour.TrackerPool([closing.tracker], dead_seconds=5)
        if answered:
            assert pool.request("get_paths", {"key": "k"})[1] == closing.address
        else:
            with pytest.raises(TrackerUnavailableError, match="closed the connection"):
                pool.request("get_paths", {"key": "k"})
        tries = min(closes + 1, 3)
        assert (closing.connections, len(closing.requests)) == (tries, tries)
        assert pool.live_trackers() == [closing.address]
        assert pool.request("get_paths", {"key": "k"})[1] == closing.address
    finally:
        closing.stop()


@both_flavours
def test_a_command_not_safe_to_repeat_is_not_sent_again_when_a_new_connection_is_closed(flavour: Flavour) -> None:
    closes = [True]
    closing = ScriptedTracker(lambda line: None if closes and closes.pop() else b"OK \r\n")
    try:
        pool = flavour.TrackerPool([closing.tracker], dead_seconds=5)
        with pytest.raises(OutcomeUnknownError, match="closed the connection"):
            pool.request("rename", {"from_key": "a", "to_key": "b"})
        assert len(closing.requests) == 1
        assert pool.live_trackers() == [closing.address]
        assert pool.request("rename", {"from_key": "a", "to_key": "b"})[1] == closing.address
    finally:
        closing.stop()


@both_flavours
def test_a_connection_closed_by_the_tracker_between_commands_is_replaced(tracker: ScriptedTracker,
                                                                         flavour: Flavour) -> None:
    pool = flavour.TrackerPool([tracker.tracker])
    pool.request("create_open", {"key": "k"})
    tracker.drop_connections()
    time.sleep(0.05)
    # Not idempotent, yet safe: the stale connection is noticed before anything is sent.
    pool.request("create_close", {"key": "k"})
    assert tracker.connections == 2
    assert len(tracker.requests) == 2


@both_flavours
def test_a_line_sent_after_a_reply_is_never_taken_for_the_next_reply(flavour: Flavour) -> None:
    # Sent in one packet with the reply, the stray line waits in the reader's buffer, where a
    # check of the socket alone does not see it: the next request took it for its own reply.
    def echo_then_stray(line: bytes) -> bytes:
        reply = b"OK key=" + line.rstrip().split(b"key=")[1] + b"\r\n"
        return reply + b"OK key=stray\r\n" if b"key=first" in line else reply

    server = ScriptedTracker(echo_then_stray)
    try:
        pool = flavour.TrackerPool([server.tracker])
        assert pool.request("get_paths", {"key": "first"})[0]["key"] == "first"
        assert pool.request("get_paths", {"key": "second"})[0]["key"] == "second"
        assert server.connections == 2
    finally:
        server.stop()


@both_flavours
def test_an_idempotent_command_cut_midway_is_retried_on_a_new_connection(flavour: Flavour) -> None:
    calls = []

    def hang_up_once(line: bytes) -> bytes | None:
        calls.append(line)
        return None if len(calls) == 2 else ok(line)

    server = ScriptedTracker(hang_up_once)
    try:
        pool = flavour.TrackerPool([server.tracker])
        pool.request("get_paths", {"key": "k"})
        assert pool.request("get_paths", {"key": "k"})[0]["paths"] == "1"
        assert server.connections == 2 and len(calls) == 3
    finally:
        server.stop()


@both_flavours
def test_an_update_class_cut_midway_is_sent_again_as_setting_a_class_twice_changes_nothing(
        flavour: Flavour) -> None:
    calls = []

    def hang_up_once(line: bytes) -> bytes | None:
        calls.append(line)
        return None if len(calls) == 2 else b"OK \r\n"

    server = ScriptedTracker(hang_up_once)
    try:
        pool = flavour.TrackerPool([server.tracker])
        pool.request("noop")
        # The command Client.update_class sends (cmd_updateclass), not the admin's update_class.
        assert pool.request("updateclass", {"domain": "d", "key": "k", "class": "thumb"})[0] == {}
        assert sum(line.startswith(b"updateclass ") for line in calls) == 2
    finally:
        server.stop()


@both_flavours
def test_a_non_idempotent_command_cut_midway_is_not_repeated(flavour: Flavour) -> None:
    calls = []

    def hang_up_once(line: bytes) -> bytes | None:
        calls.append(line)
        return None if line.startswith(b"rename") else b"OK \r\n"

    server = ScriptedTracker(hang_up_once)
    try:
        pool = flavour.TrackerPool([server.tracker])
        pool.request("noop")
        with pytest.raises(TrackerUnavailableError, match="may or may not have been carried out"):
            pool.request("rename", {"from_key": "a", "to_key": "b"})
        assert sum(line.startswith(b"rename") for line in calls) == 1
    finally:
        server.stop()


@both_flavours
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HELLO there\r\n", id="unknown-reply"),
        pytest.param(b"OK paths=1&path1=http://x", id="cut-line-then-close"),
        pytest.param(b"OK " + b"k=v&" * (1024 * 1024 + 10) + b"\r\n", id="oversized"),
    ],
)
def test_garbage_is_a_protocol_error_and_the_connection_is_not_reused(reply: bytes, flavour: Flavour) -> None:
    replies = iter([reply, b"OK \r\n"])
    server = ScriptedTracker(lambda line: next(replies))
    try:
        pool = flavour.TrackerPool([server.tracker], io_timeout=2)
        with pytest.raises(TrackerUnavailableError, match="no tracker answered: .*tracker reply"):
            pool.request("get_paths", {"key": "k"})
        assert pool.request("noop")[0] == {}  # not marked dead, on a new connection
        assert server.connections == 2
    finally:
        server.stop()


@both_flavours
@pytest.mark.parametrize("reply", [b"ERR\r\n", b"HTTP/1.1 400 Bad Request\r\n", b"OK paths=1&pa"],
                         ids=["bare-err", "http", "cut"])
def test_a_tracker_that_misspeaks_is_passed_over_for_a_command_safe_to_repeat(reply: bytes, flavour: Flavour) -> None:
    garbled = ScriptedTracker(lambda line: reply)
    good = ScriptedTracker(lambda line: b"OK paths=1&path1=http://n/dev1/0/000/000/0000000001.fid\r\n")
    try:
        pool = flavour.TrackerPool([garbled.tracker, good.tracker], io_timeout=2)
        for _ in range(2):  # not marked dead: asked first each time, as a tracker that closes is
            reply_args, answered = pool.request("get_paths", {"key": "k"})
            assert (reply_args["paths"], answered) == ("1", good.address)
        assert len(garbled.requests) == 2
        with pytest.raises(OutcomeUnknownError, match="may or may not have been carried out"):
            pool.request("delete", {"domain": "d", "key": "k"})
        assert len(good.requests) == 2  # the delete was not repeated there
    finally:
        garbled.stop()
        good.stop()


@both_flavours
@pytest.mark.parametrize("reply", [b"OK paths=x\r\n", b"OK paths=2&path1=http://n/dev1/0/000/000/0000000009.fid\r\n",
                                   b"OK \r\n"], ids=["not-a-number", "a-path-short", "empty"])
def test_a_tracker_whose_reply_cannot_be_read_is_passed_over_for_the_next(reply: bytes, flavour: Flavour) -> None:
    # An OK line its caller cannot read is a tracker misspeaking: every request failed with it.
    garbled = ScriptedTracker(lambda line: reply)
    good = ScriptedTracker(lambda line: b"OK paths=1&path1=http://n/dev1/0/000/000/0000000001.fid\r\n")
    try:
        client = flavour.Client(DOMAIN, [garbled.tracker, good.tracker], io_timeout=2)
        for turn in (1, 2, 3):  # not marked dead: asked first each time, as a tracker that cuts its reply is
            assert client.get_paths("k") == ["http://n/dev1/0/000/000/0000000001.fid"]
            # Once: not asked again on a new connection, as if it had closed the one kept open
            # (which left one more connection open to it per request).
            assert (len(garbled.requests), garbled.connections) == (turn, 1)
        garbled.stop()
        with pytest.raises(TrackerUnavailableError, match=f"no tracker answered: {garbled.tracker}: .*{good.tracker}: "
                                                          "the tracker's reply has no 'key'"):
            client.file_info("k")  # a reply for get_paths
    finally:
        garbled.stop()
        good.stop()


@both_flavours
def test_an_upload_goes_to_the_next_tracker_when_create_opens_reply_cannot_be_read(
        devmogile: DevMogileFS, flavour: Flavour) -> None:
    def misspeaking_to_create_open(line: bytes) -> bytes:
        if line.startswith(b"create_open "):
            return b"OK devid=1&path=http://n/dev1/0/000/000/0000000001.fid\r\n"  # no fid
        with socket.create_connection(devmogile.tracker_address) as sock, sock.makefile("rb") as replies:
            sock.sendall(line)  # any other command as the tracker answers it
            return replies.readline()

    garbled = ScriptedTracker(misspeaking_to_create_open)
    try:
        client = flavour.Client(DOMAIN, [garbled.tracker, *devmogile.trackers], io_timeout=2)
        client.store_content("opened", b"stored", cls="thumb")
        assert client.get_file_data("opened") == b"stored"
        assert [line.split()[0] for line in garbled.requests] == [b"create_open", b"create_close", b"get_paths",
                                                                  b"file_info"]
    finally:
        garbled.stop()


@both_flavours
def test_an_error_reply_keeps_the_connection(tracker: ScriptedTracker, flavour: Flavour) -> None:
    tracker.script = lambda line: b"ERR unknown_key unknown_key\r\n"
    pool = flavour.TrackerPool([tracker.tracker])
    for _ in range(3):
        with pytest.raises(UnknownKeyError):
            pool.request("get_paths", {"key": "k"})
    assert tracker.connections == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
@pytest.mark.parametrize("fork", [os.fork, fork_without_hooks], ids=["os.fork", "without-hooks"])
def test_a_forked_child_opens_its_own_connection(tracker: ScriptedTracker, fork: Callable[[], int]) -> None:
    pool = TrackerPool([tracker.tracker])
    pool.request("noop")
    pid = fork()
    if pid == 0:  # child: must not touch the parent's socket
        try:
            pool.request("noop")
            # Its copy of the parent's socket closed (a pool's closer kept it for the child's life).
            os._exit(0 if node_connections(int(tracker.tracker.rpartition(":")[2]), os.getpid()) == 1 else 2)
        except BaseException:
            os._exit(1)
    assert exit_code(pid) == 0
    pool.request("noop")
    assert tracker.connections == 2  # the parent's one, kept, and the child's own


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:7001", ("10.0.0.1", 7001)),
        ("tracker", ("tracker", 7001)),
        ("[::1]:7002", ("::1", 7002)),
        ("fe80::1:2", ("fe80::1:2", 7001)),  # a bare IPv6 address has no port: its colons are its own
        ("tracker-1.example_site.com:7002", ("tracker-1.example_site.com", 7002)),
        ("tracker.example.com.:7002", ("tracker.example.com.", 7002)),
        ("[fe80::1%eth0]:7002", ("fe80::1%eth0", 7002)),
        ("t" * 63 + ".example.com", ("t" * 63 + ".example.com", 7001)),
    ],
)
def test_tracker_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.1:7001;10.0.0.2:7001", "10.0.0.1:7001:7002", "http://tracker:7001",
                                  "[tracker]:7001", "tracker:0", ":7001", "a b:7001",
                                  "tracker1..example.com:7001", ".tracker:7001", "t" * 64 + ".example.com:7001",
                                  "t." * 127 + "com:7001", "fe80::1%eth0..1", "[::1%" + "e" * 60 + "]:7001",
                                  "tracker:\u0663"])
def test_a_tracker_address_that_names_no_host_and_port_is_refused(text: str) -> None:
    """Two addresses run together would otherwise load, and then answer every request with a 503;
    a name with an empty or over-long label fails at connect with a UnicodeError, which no tracker
    failover catches."""
    with pytest.raises(ValueError, match="not host:port"):
        parse_address(text)


def test_tracker_lists() -> None:
    assert parse_trackers("a:1, b:2\nc:3") == [("a", 1), ("b", 2), ("c", 3)]
    with pytest.raises(ValueError, match="no tracker"):
        parse_trackers("")
    with pytest.raises(ValueError, match="not host:port"):
        parse_trackers(["a:b"])
    with pytest.raises(ValueError, match=r"^tracker address 'a:' is not host:port \(in 'a: 7001', whose commas and "
                                         r"spaces separate addresses\)$"):
        parse_trackers("a: 7001")  # "a:" named alone, which the list did not hold
    assert parse_trackers([("a", 1), ("b", "2"), "c:3"]) == [("a", 1), ("b", 2), ("c", 3)]


@pytest.mark.parametrize(("trackers", "named"), [
    pytest.param(("127.0.0.1", 7001), r"\('127.0.0.1', 7001\): a lone \(host, port\) pair", id="lone-pair"),
    pytest.param([7001], "address 7001 is not a host:port string", id="number"),
    pytest.param(b"127.0.0.1:7001", "not b'127.0.0.1:7001'", id="bytes"),
    pytest.param([b"127.0.0.1:7001"], "address b'127.0.0.1:7001' is not a host:port string", id="bytes-in-a-list"),
    pytest.param([("127.0.0.1",)], r"address \('127.0.0.1',\) is not a \(host, port\) pair", id="short-pair"),
    pytest.param([("127.0.0.1", 7001.0)], r"is not a \(host, port\) pair", id="float-port"),
    pytest.param([("127.0.0.1", True)], r"is not a \(host, port\) pair", id="bool-port"),
])
def test_trackers_of_another_type_are_refused_naming_them(trackers: object, named: str) -> None:
    """They raised AttributeError, TypeError or IndexError from inside the parsing, naming nothing."""
    with pytest.raises(ValueError, match=named):
        parse_trackers(trackers)  # type: ignore[arg-type]


@both_flavours
def test_create_close_goes_to_another_tracker_when_the_one_that_answered_create_open_is_gone(
        flavour: Flavour) -> None:
    """Trackers keep an open upload in their shared database: a tracker restarted during a long
    PUT must not fail the upload, as MogileFS::Client's next request goes to another tracker."""
    def script(line: bytes) -> bytes:
        if line.startswith(b"create_open"):
            return b"OK fid=7&devid=1&path=http://127.0.0.1:1/dev1/0/000/000/0000000007.fid\r\n"
        return b"OK \r\n"

    first, second = ScriptedTracker(script), ScriptedTracker(script)
    try:
        pool = flavour.TrackerPool([first.tracker, second.tracker])
        assert pool.request("create_open", {"key": "k"})[1] == first.address
        first.stop()
        assert pool.request("create_close", {"key": "k", "fid": 7})[1] == second.address
        assert [line[:12] for line in second.requests] == [b"create_close"]
    finally:
        second.stop()


def test_kept_connections_work_past_descriptor_1023(devmogile: DevMogileFS) -> None:
    """A busy worker has many descriptors open: reusing a tracker connection numbered past
    select()'s limit must work (each reuse checks the idle connection first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = Client(DOMAIN, devmogile.trackers)
        client.store_content("busy", b"x", cls="thumb")
        assert all(client.get_paths("busy") for _ in range(3))
        client.close()
    finally:
        for descriptor in filler:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@both_flavours
def test_a_verified_create_close_may_take_the_time_to_read_the_file_back(flavour: Flavour) -> None:
    """mogilefsd reads a new file back to check its MD5 before it answers: within io_timeout alone,
    the upload of a large file to a class that keeps checksums had an unknown outcome."""
    def slow_close(line: bytes) -> bytes:
        if line.startswith(b"create_close"):
            time.sleep(0.8)
        return b"OK \r\n"

    tracker = ScriptedTracker(slow_close)
    pool = flavour.TrackerPool([tracker.tracker], io_timeout=0.5)
    try:
        size = VERIFIED_BYTES_PER_SECOND  # a second more
        pool.request("create_close", {"fid": 7, "size": size, "checksum": "MD5:" + "0" * 32, "checksumverify": 1})
        with pytest.raises(OutcomeUnknownError):
            pool.request("create_close", {"fid": 7, "size": size, "checksum": "MD5:" + "0" * 32})
    finally:
        pool.close()
        tracker.stop()


@both_flavours
@pytest.mark.parametrize("dead_seconds", [0, 5])
def test_a_tracker_refusing_every_request_is_logged_once_however_short_its_dead_time(
        tracker: ScriptedTracker, flavour: Flavour, caplog: pytest.LogCaptureFixture, dead_seconds: float) -> None:
    """With dead_seconds=0 it is asked by every request: one line for its outage, not one each."""
    clock = FakeClock()
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{down.getsockname()[1]}"
        pool = flavour.TrackerPool([refused, tracker.tracker], dead_seconds=dead_seconds, clock=clock)
        with caplog.at_level("WARNING", logger="mogile_middleware"):
            for _ in range(50):
                assert pool.request("noop")[1] == tracker.address
                clock.now += 0.2
    skipped = f": not asked for {dead_seconds}s" if dead_seconds else ""
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 1 and re.fullmatch(rf"tracker {refused} failed \(\[Errno 111\] .*\){skipped}", logged[0])


@both_flavours
def test_one_tracker_named_twice_is_no_second_tracker_to_log_a_failover_to(
        flavour: Flavour, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{down.getsockname()[1]}"
        pool = flavour.TrackerPool([refused, refused], dead_seconds=5, clock=FakeClock())
        with caplog.at_level("WARNING", logger="mogile_middleware"), pytest.raises(TrackerUnavailableError):
            pool.request("noop")
    assert caplog.records == []
