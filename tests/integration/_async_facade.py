"""Run the client tests against both clients: blocking facades over the asyncio ones.

A test marked ``@both_flavours`` takes the ``flavour`` fixture and builds its clients and pools
with ``flavour.Client(...)`` and ``flavour.TrackerPool(...)``: the blocking classes, or
:class:`AsyncClient` and :class:`AsyncTrackerPool` behind a :class:`Blocking` facade whose every
call runs as a coroutine on one event loop in a background thread. A test without the mark gets
the blocking flavour.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mogile_middleware import AsyncClient, Client
from mogile_middleware.async_tracker import AsyncTrackerPool
from mogile_middleware.tracker import TrackerPool


class LoopThread:
    """An event loop running in a daemon thread; :meth:`run` waits for a coroutine's result there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, awaitable: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class Blocking:
    """``target``'s methods as blocking calls made in ``loop``'s thread: coroutines are awaited,
    async iterators become iterators; ``close()`` is ``aclose()``. Attributes pass through."""

    def __init__(self, target: Any, loop: LoopThread) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, "aclose" if name == "close" else name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            async def called() -> Any:
                result = attribute(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            result = self._loop.run(called())
            return self._iterate(result) if inspect.isasyncgen(result) else result

        return call

    def _iterate(self, iterator: Any) -> Iterator[Any]:
        while True:
            try:
                yield self._loop.run(iterator.__anext__())
            except StopAsyncIteration:
                return


class Flavour:
    """How a test builds its clients: ``name`` is ``"sync"`` or ``"async"``."""

    def __init__(self, name: str, loop: LoopThread | None = None) -> None:
        self.name = name
        self.Client: Callable[..., Any] = Client if loop is None else self._blocking(AsyncClient, loop)
        self.TrackerPool: Callable[..., Any] = TrackerPool if loop is None else self._blocking(AsyncTrackerPool, loop)

    @staticmethod
    def _blocking(cls: type, loop: LoopThread) -> Callable[..., Blocking]:
        return lambda *args, **kwargs: Blocking(cls(*args, **kwargs), loop)


#: Runs a test with the blocking client and again with the asyncio one.
both_flavours = pytest.mark.parametrize("flavour", ["sync", "async"], indirect=True)


@pytest.fixture
def flavour(request: pytest.FixtureRequest) -> Iterator[Flavour]:
    """The clients a test builds: blocking, or (with ``@both_flavours``) the asyncio ones too."""
    if getattr(request, "param", "sync") == "sync":
        yield Flavour("sync")
        return
    loop = LoopThread()
    try:
        yield Flavour("async", loop)
    finally:
        loop.stop()
