"""The broker-restart scenario of issue 8, shared by its two runs so that both assert the same:
Apache Kafka in Docker (tests/faults/test_broker_restart.py) and Tansu on durable storage, its
``s3://`` engine against a local S3 server (tests/faults/test_broker_restart_tansu.py).

Under a steady load with merges and group updates, the broker is killed with SIGKILL, stays down
a few seconds and starts again on the same address with its data; then nothing the broker
acknowledged is lost, nothing is in ClickHouse twice, and persons and groups equal the run
without faults (``checks.reference``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from headwater.settings import Settings
from tests.conftest import wait_until
from tests.faults.checks import (
    Deployment,
    assert_exactly_once,
    assert_same_persons_and_groups,
    counts,
    reference,
    wait_for_rows,
    warm_up,
)
from tests.faults.conftest import by_mode
from tests.faults.load import TEAM, Gate, Load, Mix

RESTARTS = by_mode(1, 3)
DOWN_S = by_mode(5, 15)
RATE = by_mode(200, 300)
UP_S = by_mode(5, 10)  # load before each kill, and after the last restart
TIMEOUT = by_mode(600, 1200)  # the test's pytest timeout


@dataclass
class Broker:
    """How the scenario controls the broker: ``kill`` sends SIGKILL to the broker process and
    returns once it is dead; ``start`` starts it again on the same address with the same data."""

    name: str
    bootstrap: str
    kill: Callable[[], None]
    start: Callable[[], None]


def listening(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def kill_9_of_the_broker_under_load(broker: Broker, env: dict[str, str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """The scenario: ``env`` is the deployment's (``test_env`` and the caller's overrides); its
    bootstrap is set to the broker's here."""
    from headwater.kafka_admin import ensure_topics
    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import apply_migrations

    env = {**env, "HEADWATER_KAFKA_BOOTSTRAP": broker.bootstrap, "HEADWATER_KAFKA_SESSION_TIMEOUT_MS": "6000"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    db = settings.clickhouse.database
    ensure_topics(settings)
    client = connect(settings.clickhouse)
    apply_migrations(client, db)
    deployment = Deployment(env, tmp_path, settings)
    gate = Gate(settings)
    started = time.monotonic()
    try:
        mix = Mix(seed)
        deployment.worker(0)
        deployment.worker(1)
        deployment.sink()
        load = Load(settings, RATE, mix, gate)
        warm_up(deployment, load, mix, client, db, wait_s=180, flush_s=120)
        gate.start()
        with load:
            for _ in range(RESTARTS):
                time.sleep(UP_S)
                broker.kill()
                deployment.note(f"kill -9 of the {broker.name} broker")
                time.sleep(DOWN_S)
                broker.start()
                wait_until(lambda: listening(broker.bootstrap), 120, message="the broker listening again")
                deployment.note(f"{broker.name} broker started again")
            time.sleep(UP_S)
        gate.stop()
        acked = {m.uuid for m in load.acked_events()}
        assert not load.failed, f"{len(load.failed)} messages not acknowledged: {load.failed[0].error}"
        wait_for_rows(deployment, client, db, TEAM, load.acked_events(), by_mode(240, 360))
        deployment.note("every acknowledged event is a row")
        assert_exactly_once(client, db, TEAM, acked)
        want = reference(load.messages, [TEAM], settings.partitions)
        assert_same_persons_and_groups(client, db, TEAM, want)
        rows, unique = counts(client, db, TEAM)
        print(f"{broker.name}: {len(load.messages)} messages sent, {len(load.acked)} acknowledged "
              f"({len(acked)} events); events rows {rows}, distinct uuids {unique}; persons "
              f"{len(want.tables.persons)}, groups {len(want.groups)}; {RATE}/s, {RESTARTS} broker kills of "
              f"{DOWN_S}s; {time.monotonic() - started:.0f}s")
        print("\n".join(deployment.events))
    finally:
        gate.stop()
        deployment.stop()
        client.close()
