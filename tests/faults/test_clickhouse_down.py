"""ClickHouse unavailable (its process stopped) for 30 s (10 s in the short run) while the whole
pipeline runs under a steady load with merges and group updates: the workers go on, the sink
retries without committing, and afterwards every acknowledged event is in ClickHouse exactly
once and persons and groups equal the run without faults."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from headwater.settings import Settings
from tests.conftest import ROOT, free_port, stop_process, wait_until
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

pytestmark = [pytest.mark.faults, pytest.mark.pipeline, pytest.mark.timeout(by_mode(300, 600))]

OUTAGE_S = by_mode(10, 30)
RATE = by_mode(250, 300)


class OwnClickHouse:
    """An embedded ClickHouse process of this test alone, on its own data folder: stoppable."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.data_dir = tmp_path / "chdb"
        self.log = tmp_path / "clickhouse.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "headwater.embedded.clickhouse_http", "--data-dir", str(self.data_dir),
                 "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(self.up, 60, message="own ClickHouse /ping")

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def test_clickhouse_down_under_load_loses_and_duplicates_nothing(test_env, kafka_bootstrap, tmp_path, monkeypatch, seed) -> None:
    from headwater.kafka_admin import ensure_topics
    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import apply_migrations

    own = OwnClickHouse(tmp_path)
    own.start()
    env = {**test_env, "HEADWATER_CLICKHOUSE_URL": f"http://127.0.0.1:{own.port}/faults"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    db = settings.clickhouse.database
    ensure_topics(settings)
    deployment = Deployment(env, tmp_path, settings)
    client = connect(settings.clickhouse)
    gate = Gate(settings)
    try:
        apply_migrations(client, db)
        mix = Mix(seed)
        deployment.worker(0)
        deployment.worker(1)
        deployment.sink()
        load = Load(settings, RATE, mix, gate)
        warm_up(deployment, load, mix, client, db, wait_s=90)
        gate.start()
        with load:
            time.sleep(by_mode(5, 10))
            before = counts(client, db, TEAM)[0]
            client.close()
            own.stop()
            deployment.note("ClickHouse stopped")
            time.sleep(OUTAGE_S)
            own.start()
            deployment.note("ClickHouse started")
            client = connect(settings.clickhouse)
            time.sleep(by_mode(5, 10))
        gate.stop()
        acked = {m.uuid for m in load.acked_events()}
        assert not load.failed and len(acked) == len(load.messages)
        wait_for_rows(deployment, client, db, TEAM, load.acked_events(), by_mode(120, 180))
        assert_exactly_once(client, db, TEAM, acked)
        want = reference(load.messages, [TEAM], settings.partitions)
        assert_same_persons_and_groups(client, db, TEAM, want)
        sink_log = deployment.log("sink")
        assert "nothing committed" in sink_log and "ClickHouse is back" in sink_log
        retries = sink_log.count("nothing committed")
        print(f"{len(acked)} events at {RATE}/s; {before} rows before the {OUTAGE_S}s outage; "
              f"the sink retried {retries} times; the gate's queries failed {gate.errors} times")
        print("\n".join(deployment.events))
    finally:
        gate.stop()
        deployment.stop()
        client.close()
        own.stop()
