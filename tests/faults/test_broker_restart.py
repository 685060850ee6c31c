"""kill -9 of a real Kafka broker (Apache Kafka in Docker, through testcontainers) under a steady
load with merges and group updates, then a restart with its data: nothing the broker acknowledged
is lost, nothing is in ClickHouse twice, persons and groups equal the run without faults.

Needs Docker (skipped with the reason without it, as tests/docker/ are). The embedded broker
cannot take this test: its storage is memory only, so a restart loses everything by design.
The same scenario (tests/faults/broker_restart.py) runs without Docker against Tansu on durable
storage, its ``s3://`` engine on a local S3 server: tests/faults/test_broker_restart_tansu.py.
The broker's port on the host is fixed before the start, so that the restarted container
advertises the same address to the clients that reconnect.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import free_port
from tests.docker.conftest import docker_engine_reason
from tests.faults.broker_restart import TIMEOUT, Broker, kill_9_of_the_broker_under_load

pytestmark = [pytest.mark.faults, pytest.mark.docker, pytest.mark.timeout(TIMEOUT)]

KAFKA_IMAGE = "apache/kafka:3.9.1"


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


def test_kill_9_of_the_kafka_broker_under_load_loses_nothing_acknowledged(
        kafka_container, test_env, tmp_path, monkeypatch, seed) -> None:
    container = kafka_container.get_wrapped_container()
    broker = Broker("Kafka", kafka_container.get_bootstrap_server(),
                    kill=container.kill,  # SIGKILL to the broker process
                    start=container.start)
    # Apache Kafka resolves and filters transactions (ADR 0015)
    env = {**test_env, "HEADWATER_KAFKA_ISOLATION_LEVEL": "read_committed"}
    kill_9_of_the_broker_under_load(broker, env, tmp_path, monkeypatch, seed)
