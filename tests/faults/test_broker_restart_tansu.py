"""kill -9 of the Tansu broker on durable storage under a steady load with merges and group updates,
then a restart with its data: the scenario of tests/faults/test_broker_restart.py (shared in
tests/faults/broker_restart.py, the same assertions), without Docker.

The embedded broker's memory storage cannot survive a restart, so here Tansu runs its ``s3://``
storage engine (``--storage-engine s3://<bucket>/``, Rust's object_store underneath) against a
local S3 server, moto's (``moto[server]``, in the test extras), on 127.0.0.1. Tansu reads the S3
settings from the environment: ``AWS_ENDPOINT`` (the moto server), ``AWS_ALLOW_HTTP=true``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (anything: moto accepts any) and
``AWS_DEFAULT_REGION``; the bucket is created before the broker starts. The broker is killed
with SIGKILL and started again on the same port against the same bucket; the S3 server (the
"disk") keeps running. As on the memory engine, the deployment reads transactional topics
read_uncommitted (ADR 0015; ``test_env``).

Status: marked xfail and not run by default (a failing run waits out the 240 s of
``wait_for_rows``; ``pytest --runxfail`` runs it). The durable broker itself survives kill -9:
topics, records, committed offsets and groups are there after the restart, and every message of
the load is acknowledged. The identity workers do not get through the restart:
- in 2 of 3 runs they hang in ``send_offsets_to_transaction``: after the only broker restarts,
  librdkafka 2.16's re-bootstrap decommissions the broker that is cached as group coordinator
  and the call never returns, its timeout not applied (librdkafka issues #5511, #5456);
- in the third, they sit in ``consume()`` while hundreds of records wait after their committed
  offsets (their fetches come back empty; a new consumer reads the records), cause not found.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from headwater.embedded.broker import broker_command, wait_for_port
from tests.conftest import free_port, stop_process
from tests.faults.broker_restart import TIMEOUT, Broker, kill_9_of_the_broker_under_load

pytestmark = [
    pytest.mark.faults,
    pytest.mark.timeout(TIMEOUT),
    pytest.mark.xfail(run=False, reason="after the broker's restart the identity workers stall: librdkafka 2.16's "
                      "send_offsets_to_transaction never returns (librdkafka #5511, #5456), or their fetches "
                      "come back empty; pytest --runxfail runs it"),
]

BUCKET = "headwater-tansu"
HOST = "127.0.0.1"


class DurableTansu:
    """A moto S3 server and Tansu on ``s3://BUCKET/`` in it, each on a free port of 127.0.0.1.
    ``kill`` (SIGKILL) and ``start`` act on the broker only, which comes back on the same port."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.s3_port = free_port()
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.s3_port}"
        self.bootstrap = f"{HOST}:{self.port}"
        self.s3: subprocess.Popen | None = None
        self.broker: subprocess.Popen | None = None
        self.starts = 0

    def _spawn(self, command: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.log_dir / log_name, "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start_s3(self) -> None:
        import boto3

        self.s3 = self._spawn([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.s3_port)], "moto.log")
        wait_for_port(HOST, self.s3_port, 60)
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="headwater",
                     aws_secret_access_key="headwater", region_name="us-east-1").create_bucket(Bucket=BUCKET)

    def broker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        return {**env, "AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "headwater",
                "AWS_SECRET_ACCESS_KEY": "headwater", "AWS_DEFAULT_REGION": "us-east-1", "RUST_LOG": "warn"}

    def start(self) -> None:
        assert self.broker is None or self.broker.poll() is not None, "the broker is running"
        command = [*broker_command(self.port, HOST), "--storage-engine", f"s3://{BUCKET}/"]
        self.broker = self._spawn(command, "tansu.log", self.broker_env())
        self.starts += 1
        wait_for_port(HOST, self.port, 60)
        assert self.broker.poll() is None, f"Tansu exited at start, see {self.log_dir / 'tansu.log'}"

    def kill(self) -> None:
        assert self.broker is not None and self.broker.poll() is None, "the broker is not running"
        os.kill(self.broker.pid, signal.SIGKILL)
        self.broker.wait(10)

    def objects(self) -> int:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="headwater",
                          aws_secret_access_key="headwater", region_name="us-east-1")
        return sum(page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET))

    def stop(self) -> None:
        for process in (self.broker, self.s3):
            if process is not None:
                stop_process(process)


@pytest.fixture
def durable_tansu(tmp_path: Path) -> Iterator[DurableTansu]:
    missing = [m for m in ("moto", "flask", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs moto[server] (the test extras) for a local S3 server: {', '.join(missing)} not installed")
    tansu = DurableTansu(tmp_path)
    try:
        tansu.start_s3()
        tansu.start()
        yield tansu
        try:
            print(f"S3 bucket {BUCKET}: {tansu.objects()} objects after {tansu.starts} broker starts")
        except Exception as error:  # only a figure for the log
            print(f"S3 bucket {BUCKET}: not listed ({error})")
    finally:
        tansu.stop()


@pytest.fixture
def kafka_bootstrap(durable_tansu: DurableTansu) -> str:
    """This test's deployment uses the durable broker, not the session's memory one."""
    return durable_tansu.bootstrap


def test_kill_9_of_tansu_on_s3_under_load_loses_nothing_acknowledged(
        durable_tansu, test_env, tmp_path, monkeypatch, seed) -> None:
    broker = Broker("Tansu (s3)", durable_tansu.bootstrap, kill=durable_tansu.kill, start=durable_tansu.start)
    kill_9_of_the_broker_under_load(broker, test_env, tmp_path, monkeypatch, seed)
