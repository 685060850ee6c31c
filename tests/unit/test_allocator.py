"""headwater/allocator.py: freed heap memory goes back to the system after work (ADR 0016)."""

from __future__ import annotations

import os
import sys

import pytest

from headwater import allocator

glibc = pytest.mark.skipif(allocator._LIBC is None or not sys.platform.startswith("linux"), reason="glibc only")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc
def test_a_trim_after_work_returns_freed_heap_pages_to_the_system():
    # 96 MB in 2 KB blocks (malloc, not pymalloc), then blocks above them all, so that freeing
    # them leaves a hole glibc keeps: only malloc_trim gives its pages back. The list is made at
    # its full size first: growing it would free its old arrays among the blocks, and a guard
    # could land in one of those holes instead of above; 64 guards, so the last ones are on top
    # whatever free chunks of their size earlier tests left
    blocks: list[bytes | None] = [None] * 48_000
    for i in range(len(blocks)):
        blocks[i] = bytes(2048)
    top = [bytes(2048) for _ in range(64)]
    before_free = _rss()
    del blocks
    kept = _rss()
    assert kept > before_free - (16 << 20), "glibc gave the hole back without a trim: the test proves nothing"
    trimmer = allocator.Trimmer(every_s=0)
    assert trimmer.tick(worked=True)
    assert _rss() < kept - (48 << 20)
    assert trimmer.trims == 1
    del top


def test_no_trim_without_work_nor_more_often_than_asked():
    idle = allocator.Trimmer(every_s=0)
    assert not idle.tick(worked=False)
    slow = allocator.Trimmer(every_s=3600)
    assert not slow.tick(worked=True)
    assert idle.trims == slow.trims == 0


@glibc
def test_the_arena_limit_is_accepted():
    assert allocator.limit_arenas(2)
