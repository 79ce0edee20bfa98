"""The body cache: bounded in bytes, oldest first, fid-named versions only."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc

import pytest

from mogile_middleware.bodies import ENTRY_BYTES, BodyCache


def test_it_keeps_small_fid_versions_only() -> None:
    bodies = BodyCache(1000, max_file_bytes=100)
    assert bodies.keeps("fid-7", 100)
    assert not bodies.keeps("fid-7", 101)  # too large: streamed every time
    assert not bodies.keeps("paths-0123abcd", 10)  # not named by a fid: its URLs may be rewritten


def test_a_file_larger_than_the_whole_cache_is_never_kept() -> None:
    assert not BodyCache(50, max_file_bytes=100).keeps("fid-1", 60)


def test_the_oldest_bodies_go_first_and_the_total_stays_bounded() -> None:
    bodies = BodyCache(2 * (100 + ENTRY_BYTES) + 50, max_file_bytes=100)
    for fid in range(1, 6):
        bodies.put(f"fid-{fid}", bytes([fid]) * 100)
        assert bodies.size <= bodies.max_bytes
    assert [bodies.get(f"fid-{fid}") is not None for fid in range(1, 6)] == [False, False, False, True, True]
    assert bodies.get("fid-5") == b"\x05" * 100


def test_putting_a_kept_version_again_counts_it_once() -> None:
    bodies = BodyCache(1000)
    bodies.put("fid-1", b"x" * 10)
    bodies.put("fid-1", b"x" * 10)
    assert bodies.size == 10 + ENTRY_BYTES


def test_the_bound_counts_each_entry_not_only_its_bytes() -> None:
    # Empty files added nothing to the count: 500,000 of them were all kept, 45 MiB over the bound.
    bodies = BodyCache(100_000)
    for fid in range(10_000):
        bodies.put(f"fid-{fid}", b"")
    assert len(bodies._bodies) == 100_000 // ENTRY_BYTES and bodies.size <= 100_000


def test_threads_putting_at_once_keep_the_count_exact() -> None:
    bodies = BodyCache(50_000, max_file_bytes=100)

    def fill(thread: int) -> None:
        for n in range(500):
            bodies.put(f"fid-{thread}-{n}", b"y" * (n % 100 + 1))

    threads = [threading.Thread(target=fill, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bodies.size == sum(len(body) + ENTRY_BYTES for body in bodies._bodies.values()) <= 50_000


def test_negative_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="body cache sizes"):
        BodyCache(-1)


def test_room_for_a_large_body_among_many_small_ones_is_made_in_one_pass() -> None:
    """Dropping the oldest body by a lookup of the first one each time took a time growing with the
    square of the number dropped: 6.5 s here, all of it on an ASGI server's event loop."""
    count = 200_000
    bodies = BodyCache(count * (1 + ENTRY_BYTES), max_file_bytes=16 * 1024 * 1024)
    for fid in range(count):
        bodies.put(f"fid-{fid}", b"x")
    started = time.perf_counter()
    bodies.put("fid-large", bytes(10 * 1024 * 1024))
    assert time.perf_counter() - started < 1.0  # 0.03 s in one pass
    assert bodies.size <= bodies.max_bytes
    assert [bodies.get(etag) is not None for etag in ("fid-0", f"fid-{count - 1}", "fid-large")] == [False, True, True]


@pytest.mark.parametrize("size", [1, 10, 50])
def test_a_cache_of_tiny_bodies_stays_within_its_bytes(size: int) -> None:
    """Each was counted with 100 bytes besides its own, where it costs up to 178 more: a cache of
    tiny files (tracking pixels, small JSON) held 1.4 times its size."""
    tracemalloc.start()
    try:
        bodies = BodyCache(4 * 1024 * 1024)
        before = tracemalloc.get_traced_memory()[0]
        for number in range(60_000):
            bodies.put(f"fid-{10_000_000 + number}", os.urandom(size))  # an ETag made per request
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(bodies._bodies) < 60_000 and held <= bodies.max_bytes
