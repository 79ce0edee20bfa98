"""Storage nodes marked down: passed by for a while, then asked again by one request at a time."""

from __future__ import annotations

import os

from mogile_middleware.downnodes import DownNodes

HUNG = "http://10.0.0.1:7500/dev1/0/000/000/0000000001.fid"
OTHER = "http://10.0.0.2:7500/dev2/0/000/000/0000000001.fid"
SAME_NODE = "http://10.0.0.1:7500/dev3/0/000/000/0000000007.fid"


def test_a_failed_node_is_passed_by_and_tried_last_while_marked() -> None:
    down = DownNodes(seconds=60)
    assert down.may_ask(HUNG) and down.ordered([HUNG, OTHER]) == [HUNG, OTHER]
    down.failed(HUNG, TimeoutError("timed out"))
    assert not down.may_ask(HUNG) and not down.may_ask(SAME_NODE) and down.may_ask(OTHER)
    assert down.ordered([SAME_NODE, OTHER]) == [OTHER, SAME_NODE]
    assert 59 < down.seconds_down(HUNG) <= 60 and down.seconds_down(OTHER) == 0
    down.answered(SAME_NODE)  # any answer of the node, for any of its files
    assert down.may_ask(HUNG)


def test_once_its_mark_runs_out_one_request_at_a_time_asks_it_again() -> None:
    down = DownNodes(seconds=0)
    down.failed(HUNG, ConnectionRefusedError())
    assert down.may_ask(HUNG)  # this request asks it
    assert not down.may_ask(SAME_NODE)  # another passes it by meanwhile
    down.done(HUNG)
    assert down.may_ask(HUNG)  # the next request asks it: no answer again, marked again
    down.seconds = 60
    down.failed(HUNG, TimeoutError())
    assert not down.may_ask(HUNG)
    down.answered(HUNG)
    assert down.may_ask(HUNG) and down.may_ask(SAME_NODE)  # up: every request asks it


def test_once_its_mark_runs_out_a_node_is_in_its_place_again() -> None:
    """It stayed last until it answered: wherever another replica answered it was never asked,
    and a node back up got no reads from the process for good."""
    down = DownNodes(seconds=0)
    down.failed(HUNG, TimeoutError())
    assert down.ordered([HUNG, OTHER]) == [HUNG, OTHER]
    assert down.may_ask(HUNG)  # this request asks it: the others pass it by meanwhile
    assert down.ordered([SAME_NODE, OTHER]) == [OTHER, SAME_NODE]
    down.answered(HUNG)
    assert down.ordered([SAME_NODE, OTHER]) == [SAME_NODE, OTHER]


def test_a_forked_child_is_asking_no_node() -> None:
    """A worker forked while its master's thread was asking a node asks it itself."""
    from mogile_middleware.downnodes import down_nodes

    down_nodes.seconds = 0
    try:
        down_nodes.failed(HUNG, TimeoutError())
        assert down_nodes.may_ask(HUNG)  # the parent is asking it
        pid = os.fork()
        if pid == 0:
            os._exit(0 if down_nodes.may_ask(HUNG) else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        down_nodes.seconds = DownNodes().seconds
        down_nodes.clear()


def test_a_url_without_a_node_is_never_marked() -> None:
    down = DownNodes(seconds=60)
    down.failed("http://[::1/broken", ValueError("bad"))
    assert down.may_ask(OTHER) and down.ordered([OTHER]) == [OTHER]
