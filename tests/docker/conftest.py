"""Docker-only tests: real Apache Kafka and clickhouse-server through testcontainers / compose.
They skip, with the reason, on machines without a Docker engine (like the development and CI
machines of this project, where Tansu and chDB stand in).

Here the session's broker and ClickHouse (the ``kafka_bootstrap`` and ``clickhouse_url`` fixtures of
tests/conftest.py) are containers, so the pipeline tests imported by the modules of this folder run
unchanged against Apache Kafka and clickhouse-server: the same assertions, other servers."""

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.docker.servers import clickhouse_container, kafka_container


def docker_engine_reason() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return "no Docker engine answers (`docker info` failed)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "docker" not in item.keywords:
            continue
        if not checked:
            reason, checked = docker_engine_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"needs Docker: {reason}"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with kafka_container() as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def kafka_isolation_level() -> str:
    return "read_committed"  # Apache Kafka resolves and filters transactions (ADR 0015)


@pytest.fixture(scope="session")
def clickhouse_url() -> Iterator[str]:
    with clickhouse_container() as url:
        yield url
