"""The local stack behind ``headwater up`` and ``headwater demo``.

Order: embedded broker (if no ``HEADWATER_KAFKA_BOOTSTRAP``), embedded ClickHouse (if no
``HEADWATER_CLICKHOUSE_URL``), topics, migrations, then the pipeline's own processes (identity
workers, sink) and the capture endpoint on ``HEADWATER_CAPTURE_ADDR``. Children get the resolved
addresses in their environment, so none of them starts another embedded component. The broker is
never restarted (memory storage: a restart would lose the log); other children are restarted when
they die. Children stop in reverse order: capture first (it answers what it accepted and flushes
its producer while the broker still runs), the broker last.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from .embedded.broker import broker_command, port_in_use, wait_for_port
from .kafka_admin import ensure_topics
from .settings import EMBEDDED_HOST, Settings
from .supervisor import Child, Supervisor

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    pass


def _wait_for_clickhouse(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise StackError(f"embedded ClickHouse did not answer at {url} within {timeout:.0f}s")
        time.sleep(0.1)


def _probe_host(host: str) -> str:
    """Where to reach a server bound to ``host`` (a wildcard address is reached on loopback)."""
    return {"": EMBEDDED_HOST, "0.0.0.0": EMBEDDED_HOST, "::": "::1"}.get(host, host)


def _wait_for_capture(host: str, port: int, child: Child, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    url = f"http://{host}:{port}/_readiness" if ":" not in host else f"http://[{host}]:{port}/_readiness"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if not child.alive:
            raise StackError(f"capture exited at start; see {child.log_path}")
        if time.monotonic() > deadline:
            raise StackError(f"capture did not answer at {url} within {timeout:.0f}s; see {child.log_path}")
        time.sleep(0.1)


def _claim_port(port: int, component: str) -> int:
    """The embedded component's port, or a StackError saying what to do if it is taken."""
    if port_in_use(EMBEDDED_HOST, port):
        url = "BOOTSTRAP" if component == "KAFKA" else "URL"
        raise StackError(
            f"port {port} is taken: is another headwater up running? "
            f"Stop it, or set HEADWATER_EMBEDDED_{component}_PORT / HEADWATER_{component}_{url}."
        )
    return port


class LocalStack:
    def __init__(self, settings: Settings, *, workers: int = 1, capture: bool = True) -> None:
        self.settings = settings
        self.workers = workers
        self.capture = capture
        data_dir = Path(settings.data_dir).resolve()
        self.supervisor = Supervisor(data_dir / "logs")
        self.data_dir = data_dir
        self.child_env: dict[str, str] = {}

    def start(self) -> None:
        s = self.settings
        if self.capture:  # before anything is started: a taken address is the user's to fix
            self._claim_capture_addr()
        if s.embedded_kafka:
            port = _claim_port(s.embedded_kafka_port, "KAFKA")
            self.supervisor.start("broker", broker_command(port), restart=False)
            wait_for_port(EMBEDDED_HOST, port, 30)
        if s.embedded_clickhouse:
            port = _claim_port(s.embedded_clickhouse_port, "CLICKHOUSE")
            chdb_dir = self.data_dir / "chdb"
            chdb_dir.mkdir(parents=True, exist_ok=True)
            self.supervisor.start(
                "clickhouse",
                [sys.executable, "-m", "headwater.embedded.clickhouse_http", "--data-dir", str(chdb_dir), "--host", EMBEDDED_HOST, "--port", str(port)],
            )
            _wait_for_clickhouse(f"http://{EMBEDDED_HOST}:{port}", 60)
        # the children see a configured broker: tell them how to read it (ADR 0015)
        self.child_env = {"HEADWATER_KAFKA_BOOTSTRAP": s.bootstrap_servers,
                          "HEADWATER_KAFKA_ISOLATION_LEVEL": s.isolation_level}
        if s.embedded_clickhouse:
            self.child_env["HEADWATER_CLICKHOUSE_URL"] = f"http://{EMBEDDED_HOST}:{s.embedded_clickhouse_port}/{s.clickhouse_database}"
        for status in ensure_topics(s):
            log.info("topic %s: %s %s", status.name, status.state, status.detail)
        self._migrate()
        for i in range(self.workers):
            self.supervisor.start(
                f"identity-{i}", [sys.executable, "-m", "headwater.cli", "worker", "identity", "--worker-id", str(i)], self.child_env
            )
        self.supervisor.start("sink", [sys.executable, "-m", "headwater.cli", "sink"], self.child_env)
        if self.capture:
            self._start_capture()

    def _claim_capture_addr(self) -> None:
        host, port = self.settings.capture_host_port
        if port_in_use(_probe_host(host), port):
            raise StackError(
                f"capture address {self.settings.capture_addr} is taken: is another headwater up or capture "
                f"running? Stop it, or set HEADWATER_CAPTURE_ADDR."
            )

    def _start_capture(self) -> None:
        """``headwater capture`` on HEADWATER_CAPTURE_ADDR, once it answers its readiness check."""
        host, port = self.settings.capture_host_port
        child = self.supervisor.start("capture", [sys.executable, "-m", "headwater.cli", "capture"], self.child_env)
        _wait_for_capture(_probe_host(host), port, child, 30)

    def _migrate(self) -> None:
        from sinks.clickhouse.client import connect
        from sinks.clickhouse.migrate import apply_migrations

        client = connect(self.settings.clickhouse)
        try:
            applied = apply_migrations(client, self.settings.clickhouse.database, self.settings.clickhouse_cluster)
        finally:
            client.close()
        log.info("migrations applied: %s", ", ".join(applied) or "none (schema up to date)")

    def check(self) -> list[str]:
        events = self.supervisor.check()
        broker = next((c for c in self.supervisor.children if c.name == "broker"), None)
        if broker is not None and not broker.alive:
            raise StackError("the embedded broker died; its memory storage is gone. See logs/broker.log")
        return events

    def stop(self) -> None:
        self.supervisor.stop()
