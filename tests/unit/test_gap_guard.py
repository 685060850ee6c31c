"""processors/runtime.py GapGuard: a batch the broker skipped on a gapless topic is read again
(Tansu 0.6 can return a later batch before an earlier one is written; ADR 0015)."""

from __future__ import annotations

from processors.runtime import GapGuard
from tests.factories import FakeMessage


def M(topic: str, partition: int, offset: int) -> FakeMessage:
    return FakeMessage(None, topic=topic, partition=partition, offset=offset)


def offsets(messages) -> list[tuple[str, int, int]]:
    return [(m.topic(), m.partition(), m.offset()) for m in messages]


def test_a_skipped_batch_is_read_again_and_what_follows_it_waits():
    guard = GapGuard(["raw"])
    kept, again = guard.check([M("raw", 0, 0), M("raw", 0, 1), M("raw", 1, 0)])
    assert offsets(kept) == [("raw", 0, 0), ("raw", 0, 1), ("raw", 1, 0)] and again == []
    # offsets 2..4 of partition 0 were skipped: 5 and 6 wait, partition 1 and the inbox go on
    kept, again = guard.check([M("raw", 0, 5), M("inbox", 0, 9), M("raw", 0, 6), M("raw", 1, 1)])
    assert offsets(kept) == [("inbox", 0, 9), ("raw", 1, 1)]
    assert [(tp.topic, tp.partition, tp.offset) for tp in again] == [("raw", 0, 2)]
    assert guard.gaps == 1
    # read again from 2: the batch is there now
    kept, again = guard.check([M("raw", 0, 2), M("raw", 0, 3), M("raw", 0, 4), M("raw", 0, 5)])
    assert offsets(kept) == [("raw", 0, o) for o in (2, 3, 4, 5)] and again == []


def test_a_gap_that_stays_after_the_retries_is_taken_as_real():
    guard = GapGuard(["raw"], retries=2)
    guard.check([M("raw", 0, 0)])
    for _ in range(2):
        kept, again = guard.check([M("raw", 0, 3)])  # offsets 1 and 2 are a transaction marker, say
        assert kept == [] and [tp.offset for tp in again] == [1]
    kept, again = guard.check([M("raw", 0, 3), M("raw", 0, 4)])
    assert offsets(kept) == [("raw", 0, 3), ("raw", 0, 4)] and again == []
    assert guard.gaps == 2


def test_after_an_assignment_change_any_first_offset_is_taken():
    guard = GapGuard(["raw"])
    guard.check([M("raw", 0, 0)])
    guard.forget([("raw", 0)])
    kept, again = guard.check([M("raw", 0, 40)])
    assert offsets(kept) == [("raw", 0, 40)] and again == []


def test_without_topics_nothing_is_checked():
    guard = GapGuard([])
    messages = [M("raw", 0, 0), M("raw", 0, 7)]
    assert guard.check(messages) == (messages, [])
