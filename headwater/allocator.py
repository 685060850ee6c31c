"""Give freed memory back to the system (glibc only; elsewhere these do nothing). ADR 0016.

A worker's batches come and go (a few thousand messages, their decoded documents, the records
produced), and glibc keeps what they freed: measured on the identity worker at 10k events/s, its
heap held 330 MB of which 62 MB were in use, and every librdkafka and RocksDB thread had an arena
of its own on top. So the worker limits the arenas to two when it starts, and returns free pages
to the system now and then (``malloc_trim``), once per ``every_s`` at most and only after work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def limit_arenas(count: int = 2) -> bool:
    """At most ``count`` malloc arenas for the threads started from now on; False without glibc."""
    return _LIBC is not None and bool(_LIBC.mallopt(_M_ARENA_MAX, count))


class Trimmer:
    """Calls ``malloc_trim(0)`` at most once per ``every_s``, and only if there was work since."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.trims = 0
        self._last = time.monotonic()
        self._worked = False

    def tick(self, worked: bool) -> bool:
        """Call once per loop; ``worked``: the loop handled something. True if it trimmed."""
        self._worked = self._worked or worked
        if _LIBC is None or not self._worked or time.monotonic() - self._last < self.every_s:
            return False
        _LIBC.malloc_trim(0)
        self._last = time.monotonic()
        self._worked = False
        self.trims += 1
        return True
