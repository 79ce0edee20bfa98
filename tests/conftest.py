"""Fixtures shared by the whole suite: an embedded development MogileFS on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mogile_middleware.devserver import DevMogileFS

DOMAIN = "testdom"
#: The classes of the captured transcripts: avatar kept twice, thumb once (plus "default", 2).
CLASSES = {"avatar": 2, "thumb": 1}
WIRE_DATA = Path(__file__).parent / "data" / "mogile-wire"


@pytest.fixture
def devmogile(tmp_path: Path) -> Iterator[DevMogileFS]:
    """A running tracker with two storage nodes, domain ``testdom`` and classes avatar/thumb."""
    with DevMogileFS(data_dir=tmp_path / "mogdata", storage_nodes=2, domains={DOMAIN: CLASSES}) as mogile:
        yield mogile
