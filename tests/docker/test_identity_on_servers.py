"""Identity in the running pipeline (tests/pipeline/test_identity_pipeline.py), unchanged, against
Apache Kafka (KRaft) and clickhouse-server in containers (tests/docker/conftest.py): the model's
scenarios, two concurrent workers keeping the invariants, and a worker's kill -9 mid-merges."""

import pytest

from tests.pipeline.test_identity_pipeline import (  # noqa: F401  (fixtures and tests, collected here)
    test_concurrent_sequences_with_two_workers_keep_the_invariants,
    test_env,
    test_kill_9_of_a_worker_mid_merges_then_restart_ends_as_without_the_crash,
    test_scenarios_fed_step_at_a_time_end_as_the_model,
    two_workers,
)

pytestmark = pytest.mark.docker
