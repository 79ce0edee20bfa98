"""What the asyncio side keeps per event loop (PerLoop)."""

from __future__ import annotations

import asyncio
import threading
import time

from mogile_middleware.loopnet import PerLoop


def test_two_threads_asking_at_once_for_a_loop_get_one_value() -> None:
    """The second, made while the first was, replaced it: the first's holder used a value that
    the loop then ended."""
    made: list[object] = []

    def make() -> object:
        time.sleep(0.05)
        made.append(object())
        return made[-1]

    per_loop: PerLoop[object] = PerLoop(make, lambda value: None)
    loop = asyncio.new_event_loop()
    got: list[object] = []
    askers = [threading.Thread(target=lambda: got.append(per_loop.of(loop))) for _ in range(2)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(5)
    loop.close()
    assert len(made) == 1 and got == made * 2


def test_a_value_ends_with_its_loop_and_a_closed_loops_when_another_asks() -> None:
    ended: list[str] = []
    names = iter(["first", "second", "third"])
    per_loop: PerLoop[str] = PerLoop(lambda: next(names), ended.append)

    async def value() -> str:
        return per_loop.of(asyncio.get_running_loop())

    assert asyncio.run(value()) == "first"
    assert ended == ["first"]  # at its shutdown
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(value()) == "second"
    loop.close()  # without its shutdown
    assert ended == ["first"]
    assert asyncio.run(value()) == "third"
    assert ended == ["first", "second", "third"]
