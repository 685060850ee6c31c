import os
import subprocess
import sys

import pytest

from headwater.kafka_admin import describe_cleanup_policy
from headwater.topics import ALL_TOPICS

pytestmark = pytest.mark.pipeline


def headwater(env, *args):
    return subprocess.run([sys.executable, "-m", "headwater.cli", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_topics_creates_once_then_reports_everything_in_place(test_env, settings):
    first = headwater(test_env, "topics")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == len(ALL_TOPICS)

    second = headwater(test_env, "topics")
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    assert second.stdout.count("ok ") == len(ALL_TOPICS)
    assert "all topics in place" in second.stdout

    for spec in ALL_TOPICS:
        policy = describe_cleanup_policy(settings, spec.name(settings.topic_prefix))
        assert policy == ("compact" if spec.compacted else "delete"), spec.base
