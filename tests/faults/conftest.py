"""Fault tests (issue 8, docs/adr/0011-fault-tests.md): the real pipeline (embedded Tansu and
ClickHouse, workers and sink as processes) under a steady load while processes are killed,
scaled, ClickHouse goes away, poison arrives, or one key runs hot.

Two lengths. ``pytest`` (and ``make test``, the CI) runs the short version of each scenario;
``HEADWATER_FAULTS=full`` (``make test-faults``) runs the full one: 20 kills instead of 5, a 30 s
ClickHouse outage instead of 10 s, longer loads and measurements. ``HEADWATER_FAULTS_SEED=N``
replays the random choices of a run (each test prints its seed).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from headwater.settings import Settings
from tests.faults.checks import Deployment
from tests.faults.load import TEAM
from tests.identity_harness import token_of

FULL = os.environ.get("HEADWATER_FAULTS", "").strip().lower() == "full"
OTHER_TEAM = TEAM + 1


def by_mode(short, full):
    """The short value under ``pytest``, the full one under ``HEADWATER_FAULTS=full``."""
    return full if FULL else short


@pytest.fixture
def test_env(test_env: dict[str, str]) -> dict[str, str]:
    return {**test_env, "HEADWATER_TEAMS": f"{token_of(TEAM)}:{TEAM},{token_of(OTHER_TEAM)}:{OTHER_TEAM}"}


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("HEADWATER_FAULTS_SEED") or random.SystemRandom().randrange(1_000_000))
    print(f"HEADWATER_FAULTS_SEED={value} ({'full' if FULL else 'short'} mode)")
    return value


@pytest.fixture
def deployment(settings: Settings, test_env: dict[str, str], clickhouse, tmp_path: Path) -> Iterator[Deployment]:
    """No process yet: each scenario starts the workers and the sink it needs."""
    from headwater.kafka_admin import ensure_topics

    ensure_topics(settings)
    running = Deployment(test_env, tmp_path, settings)
    try:
        yield running
    finally:
        running.stop()
        print(f"logs: {tmp_path}")
