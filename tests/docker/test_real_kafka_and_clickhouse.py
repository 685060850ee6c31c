"""The same walking skeleton against Apache Kafka (KRaft) and clickhouse-server in containers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, stop_process, wait_until

pytestmark = pytest.mark.docker

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def containers():
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer("apache/kafka:3.9.1").with_kraft() as kafka, ClickHouseContainer("clickhouse/clickhouse-server:25.3", port=8123) as ch:
        host, port = ch.get_container_host_ip(), ch.get_exposed_port(8123)
        yield kafka.get_bootstrap_server(), f"http://{ch.username}:{ch.password}@{host}:{port}/headwater"


def test_events_flow_from_kafka_to_clickhouse_server(containers, tmp_path: Path):
    from headwater.settings import Settings
    from producers.backend import Client
    from sinks.clickhouse.client import connect

    bootstrap, ch_url = containers
    env = {**os.environ, "HEADWATER_KAFKA_BOOTSTRAP": bootstrap, "HEADWATER_CLICKHOUSE_URL": ch_url, "HEADWATER_TEAMS": "phc_test:7"}
    assert subprocess.run([sys.executable, "-m", "headwater.cli", "topics"], env=env, cwd=ROOT, timeout=120).returncode == 0
    processes = [
        subprocess.Popen([sys.executable, "-m", "headwater.cli", *args], env=env, cwd=ROOT, stdout=open(tmp_path / f"{args[0]}.log", "wb"), stderr=subprocess.STDOUT)
        for args in (["worker", "identity"], ["sink"])
    ]
    try:
        settings = Settings(kafka_bootstrap=bootstrap, clickhouse_url=ch_url, teams="phc_test:7")
        client = Client.from_settings(settings, "phc_test")
        sent = {client.capture(f"u{i % 50}", "$pageview") for i in range(1000)}
        assert client.flush() == 0
        ch = connect(settings.clickhouse)

        def rows():
            try:
                return ch.query("SELECT count() FROM headwater.events").result_rows[0][0] >= 1000
            except Exception:
                return False

        wait_until(rows, 180, interval=1, message="1000 rows in clickhouse-server")
        got = {str(u) for (u,) in ch.query("SELECT uuid FROM headwater.events").result_rows}
        assert got == sent
    finally:
        for process in processes:
            stop_process(process)


def test_compose_file_is_valid():
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
