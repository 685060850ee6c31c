"""Scaling the identity workers 1 → 2 → 3 → 1 under a steady load with merges and group updates
(every step a rebalance; the last one stops two workers cleanly): every acknowledged event is in
ClickHouse exactly once, and persons and groups equal the run without faults."""

from __future__ import annotations

import time

import pytest

from tests.faults.checks import (
    assert_exactly_once,
    assert_same_persons_and_groups,
    counts,
    reference,
    wait_for_rows,
    warm_up,
)
from tests.faults.conftest import by_mode
from tests.faults.load import TEAM, Gate, Load, Mix

pytestmark = [pytest.mark.faults, pytest.mark.pipeline, pytest.mark.timeout(by_mode(300, 900))]

STEP_S = by_mode(6, 20)
RATE = by_mode(250, 300)


def test_scaling_workers_1_2_3_1_under_load(deployment, settings, clickhouse, seed) -> None:
    db = settings.clickhouse.database
    mix = Mix(seed)
    deployment.worker(0)
    deployment.sink()
    gate = Gate(settings)
    load = Load(settings, RATE, mix, gate)
    warm_up(deployment, load, mix, clickhouse, db, wait_s=90)
    gate.start()
    seen: list[tuple[int, int]] = []
    with load:
        time.sleep(STEP_S)
        seen.append((1, counts(clickhouse, db, TEAM)[0]))
        deployment.worker(1)
        time.sleep(STEP_S)
        seen.append((2, counts(clickhouse, db, TEAM)[0]))
        deployment.worker(2)
        time.sleep(STEP_S)
        seen.append((3, counts(clickhouse, db, TEAM)[0]))
        deployment.terminate("identity-2")
        deployment.terminate("identity-1")
        time.sleep(STEP_S)
        seen.append((1, counts(clickhouse, db, TEAM)[0]))
    gate.stop()
    acked = {m.uuid for m in load.acked_events()}
    assert not load.failed and len(acked) == len(load.messages)
    wait_for_rows(deployment, clickhouse, db, TEAM, load.acked_events(), by_mode(120, 180))
    assert_exactly_once(clickhouse, db, TEAM, acked)
    want = reference(load.messages, [TEAM], settings.partitions)
    assert_same_persons_and_groups(clickhouse, db, TEAM, want)
    assert all(b > a for (_, a), (_, b) in zip(seen, seen[1:])), f"a step wrote nothing: {seen}"
    print(f"{len(acked)} events at {RATE}/s; rows at the end of each step (workers, rows): {seen}")
    print("\n".join(deployment.events))
