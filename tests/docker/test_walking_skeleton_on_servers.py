"""The walking skeleton's end-to-end tests (tests/pipeline/test_walking_skeleton.py), unchanged,
against Apache Kafka (KRaft) and clickhouse-server in containers (tests/docker/conftest.py)."""

import pytest

from tests.pipeline.test_walking_skeleton import (  # noqa: F401  (collected here, on the containers)
    test_10000_events_become_10000_rows_with_deterministic_person_ids,
    test_a_row_the_sink_cannot_read_becomes_a_dead_letter_row_not_a_silent_drop,
    test_malformed_messages_become_dead_letters_and_valid_ones_around_them_arrive,
)

pytestmark = pytest.mark.docker
