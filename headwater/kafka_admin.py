"""Create or check the declared topics (``headwater topics``). Idempotent."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from .settings import Settings
from .topics import ALL_TOPICS, TopicSpec


@dataclass(frozen=True)
class TopicStatus:
    name: str
    state: str  # created | ok | mismatch
    detail: str = ""


def _wanted_partitions(spec: TopicSpec, settings: Settings) -> int:
    return spec.partitions or settings.partitions


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[TopicStatus]:
    """Create the missing topics; report the existing ones as ``ok`` or ``mismatch``."""
    admin = AdminClient(settings.kafka_config())
    existing = admin.list_topics(timeout=timeout).topics
    statuses: list[TopicStatus] = []
    to_create: list[tuple[TopicSpec, NewTopic]] = []
    for spec in ALL_TOPICS:
        name = spec.name(settings.topic_prefix)
        if name in existing:
            continue
        to_create.append(
            (spec, NewTopic(name, _wanted_partitions(spec, settings), settings.replication_factor, config=spec.all_configs()))
        )
    if to_create:
        futures = admin.create_topics([t for _, t in to_create], operation_timeout=timeout)
        for spec, new in to_create:
            try:
                futures[new.topic].result(timeout)
                statuses.append(TopicStatus(new.topic, "created", f"{new.num_partitions} partitions"))
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # another process won the race
                    raise
    created = {s.name for s in statuses}
    existing = admin.list_topics(timeout=timeout).topics
    for spec in ALL_TOPICS:
        name = spec.name(settings.topic_prefix)
        if name in created:
            continue
        statuses.append(_check(admin, spec, settings, len(existing[name].partitions), timeout))
    order = {spec.name(settings.topic_prefix): i for i, spec in enumerate(ALL_TOPICS)}
    return sorted(statuses, key=lambda s: order[s.name])


def _check(admin: AdminClient, spec: TopicSpec, settings: Settings, partitions: int, timeout: float) -> TopicStatus:
    name = spec.name(settings.topic_prefix)
    problems = []
    wanted = _wanted_partitions(spec, settings)
    if partitions != wanted:
        problems.append(f"{partitions} partitions, declared {wanted}")
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    configs = admin.describe_configs([resource])[resource].result(timeout)
    policy = configs.get("cleanup.policy")
    expected = spec.all_configs()["cleanup.policy"]
    if policy is not None and policy.value != expected:
        problems.append(f"cleanup.policy={policy.value}, declared {expected}")
    if problems:
        return TopicStatus(name, "mismatch", "; ".join(problems))
    return TopicStatus(name, "ok", f"{partitions} partitions, cleanup.policy={expected}")


def describe_cleanup_policy(settings: Settings, topic: str, timeout: float = 10.0) -> str | None:
    admin = AdminClient(settings.kafka_config())
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entry = admin.describe_configs([resource])[resource].result(timeout).get("cleanup.policy")
    return entry.value if entry else None


def co_partitioned_count(settings: Settings, topics: list[str], timeout: float = 30.0) -> int:
    """The partition count shared by ``topics`` (a stateful stage's inputs and changelog must
    have equal counts: partition *p* of each is one unit of state). Raises with the counts if not."""
    admin = AdminClient(settings.kafka_config())
    metadata = admin.list_topics(timeout=timeout)
    counts = {}
    for topic in topics:
        meta = metadata.topics.get(topic)
        if meta is None or meta.error is not None:
            raise RuntimeError(f"topic {topic} does not exist; run `headwater topics` first")
        counts[topic] = len(meta.partitions)
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"these topics must have the same number of partitions: {counts}")
    return next(iter(counts.values()))
