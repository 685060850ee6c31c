"""kill -9 of a random identity worker or the sink, at random moments, under a steady load with
merges and group updates: afterwards every acknowledged event is in ClickHouse exactly once, and
persons, distinct ids and groups equal the run without faults. The full run also sends a burst
before each worker's kill, to kill it mid-transaction."""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.checks import assert_exactly_once, assert_same_persons_and_groups, reference, wait_for_rows, warm_up
from tests.faults.conftest import by_mode
from tests.faults.load import TEAM, Gate, Load, Mix

pytestmark = [pytest.mark.faults, pytest.mark.pipeline, pytest.mark.timeout(by_mode(300, 1500))]

KILLS = by_mode(5, 20)
RATE = by_mode(250, 300)
#: Full run: before killing a worker, a burst of this many messages, so that the kill lands in a
#: long transaction more often (at the steady rate, batches commit in milliseconds and a kill rarely
#: finds one open). On Tansu such a kill leaks the aborted batch (test_tansu_transactions.py), and
#: the run can end different from the faultless one or stall: ADR 0011.
BURST = by_mode(0, 600)


def test_kill_9_of_a_worker_or_the_sink_at_random_points_under_load(deployment, settings, clickhouse, seed) -> None:
    db = settings.clickhouse.database
    rng = random.Random(seed)
    mix = Mix(seed)
    deployment.worker(0)
    deployment.worker(1)
    deployment.sink()
    gate = Gate(settings)
    load = Load(settings, RATE, mix, gate)
    warm_up(deployment, load, mix, clickhouse, db, wait_s=90)
    gate.start()
    kills: list[str] = []
    with load:
        for _ in range(KILLS):
            time.sleep(rng.uniform(1.0, 4.0))
            victim = rng.choice(["identity-0", "identity-1", "sink"])
            if BURST and victim != "sink":
                load.burst(BURST)
                time.sleep(rng.uniform(0.1, 0.4))
                deployment.note(f"burst of {BURST} messages")
            deployment.kill(victim)
            kills.append(victim)
            time.sleep(rng.uniform(0.0, 1.5))
            deployment.restart(victim)
        time.sleep(3)
    gate.stop()
    acked = {m.uuid for m in load.acked_events()}
    assert not load.failed and len(acked) == len(load.messages)
    wait_for_rows(deployment, clickhouse, db, TEAM, load.acked_events(), by_mode(120, 240))
    assert_exactly_once(clickhouse, db, TEAM, acked)
    want = reference(load.messages, [TEAM], settings.partitions)
    assert want.events == len(acked)
    assert_same_persons_and_groups(clickhouse, db, TEAM, want)
    merges = sum(1 for m in load.messages if m.kind == "merge")
    groups = sum(1 for m in load.messages if m.kind == "group")
    print(f"{len(acked)} events ({merges} merges, {groups} group updates) at {RATE}/s, {KILLS} kills: {kills}; "
          f"{len(want.tables.persons)} person rows, {len(want.groups)} groups; load behind at most {load.behind_s:.2f}s")
    print("\n".join(deployment.events))
