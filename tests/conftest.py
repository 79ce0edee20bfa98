"""Fixtures shared by the whole suite: an embedded development MogileFS on free loopback ports."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.downnodes import down_nodes

DOMAIN = "testdom"
#: The classes of the captured transcripts: avatar kept twice, thumb once (plus "default", 2).
CLASSES = {"avatar": 2, "thumb": 1}
WIRE_DATA = Path(__file__).parent / "data" / "mogile-wire"


@pytest.fixture(autouse=True)
def no_node_marked_down() -> Iterator[None]:
    """Each test starts with no storage node marked down by an earlier one (whose ports may be reused)."""
    down_nodes.clear()
    yield
    down_nodes.clear()


@pytest.fixture
def devmogile(tmp_path: Path) -> Iterator[DevMogileFS]:
    """A running tracker with two storage nodes, domain ``testdom`` and classes avatar/thumb."""
    with DevMogileFS(data_dir=tmp_path / "mogdata", storage_nodes=2, domains={DOMAIN: CLASSES}) as mogile:
        yield mogile


@pytest.fixture
def without_pymemcache(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the ``memcached`` extra were not installed: ``mogile_middleware.memcache`` does not import."""
    monkeypatch.setitem(sys.modules, "pymemcache.client.base", None)
    monkeypatch.delitem(sys.modules, "mogile_middleware.memcache", raising=False)


def require_program(program: str, package: str) -> str:
    """The path of ``program``; without it the test fails in CI (``CI=true``) and skips elsewhere.

    The test command installs these Debian packages; a developer machine may not have them.
    """
    path = shutil.which(program) or next(
        (str(candidate) for candidate in (Path("/usr/sbin") / program, Path("/usr/bin") / program)
         if candidate.exists()), None)
    if path:
        return path
    message = f"{program} is missing: install the Debian package {package!r} (apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str) -> ModuleType:
    """The module ``name``; without it the test (or, called at import, the file) fails in CI
    (``CI=true``) and skips elsewhere, as :func:`require_program`."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is installed by the test command ('.[dev]')")
