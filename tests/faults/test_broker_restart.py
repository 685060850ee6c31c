"""kill -9 of a real Kafka broker (Apache Kafka in Docker, through testcontainers) under a steady
load with merges and group updates, then a restart with its data: nothing the broker acknowledged
is lost, nothing is in ClickHouse twice, persons and groups equal the run without faults.

Needs Docker (skipped with the reason without it, as tests/docker/ are). The embedded broker
cannot take this test: its storage is memory only, so a restart loses everything by design.
The broker's port on the host is fixed before the start, so that the restarted container
advertises the same address to the clients that reconnect.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from headwater.settings import Settings
from tests.conftest import free_port, wait_until
from tests.docker.conftest import docker_engine_reason
from tests.faults.checks import (
    Deployment,
    assert_exactly_once,
    assert_same_persons_and_groups,
    counts,
    reference,
    wait_for_rows,
)
from tests.faults.conftest import by_mode
from tests.faults.load import TEAM, Gate, Load, Mix

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.timeout(by_mode(600, 1200))]

KAFKA_IMAGE = "apache/kafka:3.9.1"
RESTARTS = by_mode(1, 3)
DOWN_S = by_mode(5, 15)
RATE = by_mode(200, 300)


@pytest.fixture
def kafka_container() -> Iterator:
    reason = docker_engine_reason()
    if reason:
        pytest.skip(f"needs Docker: {reason}")
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer(KAFKA_IMAGE).with_kraft().with_bind_ports(9093, free_port())
    container.start()
    try:
        yield container
    finally:
        container.stop()


def _listening(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def test_kill_9_of_the_kafka_broker_under_load_loses_nothing_acknowledged(
        kafka_container, test_env, tmp_path, monkeypatch, seed) -> None:
    from headwater.kafka_admin import ensure_topics
    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import apply_migrations

    bootstrap = kafka_container.get_bootstrap_server()
    env = {**test_env, "HEADWATER_KAFKA_BOOTSTRAP": bootstrap, "HEADWATER_KAFKA_ISOLATION_LEVEL": "read_committed",
           "HEADWATER_KAFKA_SESSION_TIMEOUT_MS": "6000"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    db = settings.clickhouse.database
    ensure_topics(settings)
    client = connect(settings.clickhouse)
    apply_migrations(client, db)
    deployment = Deployment(env, tmp_path, settings)
    gate = Gate(settings)
    try:
        mix = Mix(seed)
        deployment.worker(0)
        deployment.worker(1)
        deployment.sink()
        load = Load(settings, RATE, mix, gate)
        warm = mix.warmup()
        load.send(warm)
        load.flush(120)
        deployment.wait_or_diagnose(lambda: counts(client, db, TEAM)[0] >= len(warm), 180, "the warm-up's rows")
        gate.start()
        broker = kafka_container.get_wrapped_container()
        with load:
            for _ in range(RESTARTS):
                time.sleep(by_mode(5, 10))
                broker.kill()  # SIGKILL to the broker process
                deployment.note("kill -9 of the Kafka broker")
                time.sleep(DOWN_S)
                broker.start()
                wait_until(lambda: _listening(bootstrap), 120, message="the broker listening again")
                deployment.note("Kafka broker started again")
            time.sleep(by_mode(5, 10))
        gate.stop()
        acked = {m.uuid for m in load.acked_events()}
        assert not load.failed, f"{len(load.failed)} messages not acknowledged: {load.failed[0].error}"
        wait_for_rows(deployment, client, db, TEAM, load.acked_events(), by_mode(240, 360))
        assert_exactly_once(client, db, TEAM, acked)
        want = reference(load.messages, [TEAM], settings.partitions)
        assert_same_persons_and_groups(client, db, TEAM, want)
        print(f"{len(acked)} events at {RATE}/s, {RESTARTS} broker kills of {DOWN_S}s")
        print("\n".join(deployment.events))
    finally:
        gate.stop()
        deployment.stop()
        client.close()
