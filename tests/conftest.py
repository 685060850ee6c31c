"""Fixtures: one embedded broker and one embedded ClickHouse per test session (real Tansu, real
chDB behind the ClickHouse HTTP interface), and per test a unique topic prefix and database.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from headwater.embedded.broker import broker_command, wait_for_port
from headwater.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.1, message: str = "") -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {message or condition!r} (last value {last!r})")


@contextmanager
def running(run: Callable[[threading.Event], None], name: str) -> Iterator[list[BaseException]]:
    """``run(stop)`` (a stage runner's or the sink's) in a thread of the test process. Yields the
    list of what it raised, for waits to stop on; on exit, stops and joins it, and fails the test
    if it raised or did not stop."""
    stop, errors = threading.Event(), []

    def target() -> None:
        try:
            run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported below, on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), f"{name} did not stop"
    assert not errors, f"{name} died: {errors!r}"


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("broker") / "broker.log", "wb")
    process = subprocess.Popen(broker_command(port), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 30)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process)
        log.close()


@pytest.fixture(scope="session")
def kafka_isolation_level() -> str:
    """How the deployment under test reads transactional topics: read_uncommitted on the session's
    Tansu broker, as the embedded stack does (ADR 0015); tests/docker overrides it for Apache Kafka."""
    return "read_uncommitted"


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    data_dir = tmp_path_factory.mktemp("chdb")
    log = open(data_dir.parent / "clickhouse.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "headwater.embedded.clickhouse_http", "--data-dir", str(data_dir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=1) as r:
                return r.status == 200
        except OSError:
            return process.poll() is not None  # died: stop waiting, fail below

    try:
        wait_until(ready, 60, message="embedded ClickHouse /ping")
        assert process.poll() is None, "embedded ClickHouse exited at start"
        yield url
    finally:
        stop_process(process)
        log.close()


@pytest.fixture
def test_env(kafka_bootstrap: str, kafka_isolation_level: str, clickhouse_url: str, tmp_path: Path) -> dict[str, str]:
    """HEADWATER_* variables of a fresh, isolated deployment: own topics, own database."""
    n = next(_counter)
    stamp = f"{os.getpid()}_{n}"
    return {
        "HEADWATER_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HEADWATER_KAFKA_ISOLATION_LEVEL": kafka_isolation_level,
        "HEADWATER_CLICKHOUSE_URL": f"{clickhouse_url}/test_{stamp}",
        "HEADWATER_TOPIC_PREFIX": f"t{stamp}_",
        "HEADWATER_KAFKA_SESSION_TIMEOUT_MS": "1000",
        "HEADWATER_PROCESSOR_BATCH_MS": "50",
        "HEADWATER_SINK_BATCH_MS": "200",
        "HEADWATER_TEAMS": "phc_test:7,phc_other:8",
        "HEADWATER_DATA_DIR": str(tmp_path / "data"),
    }


@pytest.fixture
def settings(test_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in test_env.items():
        monkeypatch.setenv(key, value)
    return Settings()


@pytest.fixture
def clickhouse(settings: Settings):
    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import apply_migrations

    client = connect(settings.clickhouse)
    apply_migrations(client, settings.clickhouse.database)
    yield client
    client.close()


class Pipeline:
    """The pipeline's processes (identity workers and sink), as real child processes."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "headwater.cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process)


@pytest.fixture
def pipeline(settings: Settings, test_env: dict[str, str], clickhouse, tmp_path: Path) -> Iterator[Pipeline]:
    from headwater.kafka_admin import ensure_topics

    ensure_topics(settings)
    running = Pipeline(test_env, tmp_path)
    running.start("identity-0", "worker", "identity", "--worker-id", "0")
    running.start("sink", "sink")
    try:
        yield running
    finally:
        running.stop()
