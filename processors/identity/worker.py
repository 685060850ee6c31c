"""The identity worker as one object: the stage, its group table follower and its runtime, wired
from settings. ``headwater worker identity`` runs it; tests build it in process."""

from __future__ import annotations

from headwater.kafka_admin import co_partitioned_count
from headwater.settings import Settings
from headwater.topics import TopicNames
from processors.follower import TopicFollower
from processors.runtime import StageRunner

from .group_table import GroupTable
from .pipeline import IdentityPipeline
from .steps.sessions import SessionRules


def identity_runner(settings: Settings, worker_id: str = "0") -> StageRunner:
    names = TopicNames(settings.topic_prefix)
    inputs = [names.events_raw, names.identity_inbox]
    partitions = co_partitioned_count(settings, [*inputs, names.identity_changelog])
    groups = GroupTable(names.group_types, names.groups)
    sessions = SessionRules(timeout_us=settings.session_timeout_s * 1_000_000,
                            max_length_us=settings.session_max_s * 1_000_000,
                            lateness_us=settings.session_lateness_s * 1_000_000)
    pipeline = IdentityPipeline(names, settings.team_by_token, partitions, settings.max_message_bytes,
                                settings.personless_team_ids, groups, sessions)
    follower = TopicFollower(settings, [names.group_types, names.groups], groups.apply, name="group-table")
    return StageRunner(settings, name="identity", input_topics=inputs, stage=pipeline,
                       changelog_topic=names.identity_changelog, worker_id=worker_id, followers=[follower],
                       gapless_topics=[names.events_raw])  # plain producers only: no markers, no gaps
