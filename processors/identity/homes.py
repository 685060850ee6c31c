"""Where identity state lives (ADR 0001): the home partition of a distinct id, a person (by its
root distinct id) and a team's merger.

The home of ``did`` of team ``t`` is the partition headwater's producers put the key
``"{token(t)}:{did}"`` on: Kafka's murmur2 partitioner (Java's default; librdkafka's
``murmur2_random`` for keyed messages), so a correctly keyed ``events_raw`` message is already
at home.
"""

from __future__ import annotations


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (seed 0x9747b28c), as a signed 32-bit int like Java's."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    rounded = length & ~3
    for i in range(0, rounded, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    extra = length & 3
    if extra == 3:
        h ^= data[rounded + 2] << 16
    if extra >= 2:
        h ^= data[rounded + 1] << 8
    if extra >= 1:
        h ^= data[rounded]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Java's default partitioner (and librdkafka's murmur2) picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Homes:
    """Home partitions for one deployment: ``team_tokens`` maps team id → its (single) token."""

    #: How many homes ``of`` remembers (murmur2 in Python costs ~15 us; a did's home is asked for
    #: several times per event). Cleared when full: a few MB at most.
    CACHE_SIZE = 100_000

    def __init__(self, team_tokens: dict[int, str], partitions: int) -> None:
        self.team_tokens = team_tokens
        self.partitions = partitions
        self._cache: dict[tuple[int, str], int] = {}

    def of(self, team_id: int, distinct_id: str) -> int:
        key = (team_id, distinct_id)
        home = self._cache.get(key)
        if home is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            home = self._cache[key] = kafka_partition(f"{self.team_tokens[team_id]}:{distinct_id}".encode(),
                                                      self.partitions)
        return home

    def merger(self, team_id: int) -> int:
        return kafka_partition(f"team:{team_id}".encode(), self.partitions)
