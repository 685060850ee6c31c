"""Apache Kafka (KRaft) and clickhouse-server in containers, for the Docker-only tests.

The images are the ones docker-compose.yml runs (tests/unit/test_deploy_offline.py checks that
they agree). testcontainers' KafkaContainer drives Confluent's image; apache/kafka is started
here as a generic container that waits for its advertised listener (the host's mapped port,
known only once the container runs) before it starts the broker.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

KAFKA_IMAGE = "apache/kafka:3.9.1"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:25.3"

_ADVERTISED = "/tmp/advertised_listeners"
_KAFKA_ENV = {
    "KAFKA_NODE_ID": "1",
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
    "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    # the pipeline tests run consumers with a 1 s session timeout (tests/conftest.py test_env)
    "KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS": "500",
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
}


@contextmanager
def kafka_container(timeout: float = 120) -> Iterator[str]:
    """A single-node KRaft broker; yields its bootstrap address as seen from this host."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    start = (f"while [ ! -s {_ADVERTISED} ]; do sleep 0.1; done; "
             f'export KAFKA_ADVERTISED_LISTENERS="$(cat {_ADVERTISED})"; exec /etc/kafka/docker/run')
    container = DockerContainer(KAFKA_IMAGE).with_exposed_ports(9092).with_command(["sh", "-c", start])
    for key, value in _KAFKA_ENV.items():
        container.with_env(key, value)
    with container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(9092)
        listener = f"PLAINTEXT://{host}:{port}".encode()
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(_ADVERTISED.rsplit("/", 1)[1])
            info.size, info.mtime, info.mode = len(listener), time.time(), 0o644
            tar.addfile(info, io.BytesIO(listener))
        container.get_wrapped_container().put_archive(_ADVERTISED.rsplit("/", 1)[0], archive.getvalue())
        LogMessageWaitStrategy("Kafka Server started").with_startup_timeout(timeout).wait_until_ready(container)
        yield f"{host}:{port}"


@contextmanager
def clickhouse_container() -> Iterator[str]:
    """clickhouse-server; yields ``http://user:password@host:port`` (no database: each test names its own)."""
    from testcontainers.community.clickhouse import ClickHouseContainer

    with ClickHouseContainer(CLICKHOUSE_IMAGE, port=8123, username="headwater", password="headwater") as ch:
        yield f"http://headwater:headwater@{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}"
