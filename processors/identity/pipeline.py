"""The identity stage, step by step: parse → resolve_person → to_event_row.

``IdentityPipeline.process_batch`` takes a batch of ``events_raw`` messages and returns the
records to send (event rows, warnings, dead letters) in input order. It never raises for one
bad message: an unexpected error becomes a dead letter ``processing_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import orjson

from headwater.outcomes import DeadLetter, Drop
from headwater.topics import TopicNames
from headwater.wire import partition_key

from ..outputs import Record, SourceMessage, dead_letter, warning_record
from .steps.parse import parse_raw_event
from .steps.person import resolve_person
from .steps.row import to_event_row

STAGE = "identity"
log = logging.getLogger(__name__)


class IdentityPipeline:
    def __init__(self, topics: TopicNames, teams: dict[str, int]) -> None:
        self.topics = topics
        self.teams = teams
        self.counts: dict[str, int] = {"ok": 0, "dead_letter": 0, "dropped": 0, "warnings": 0}

    def process_batch(self, messages: Sequence[SourceMessage]) -> list[Record]:
        out: list[Record] = []
        for message in messages:
            try:
                self._process_one(message, out)
            except Exception as exc:  # a bug must not stop the partition: dead-letter and go on
                log.exception("identity: unexpected error at %s[%s]@%s", message.topic(), message.partition(), message.offset())
                out.append(self._dead(message, "processing_error", repr(exc)[:300]))
        return out

    def _dead(self, message: SourceMessage, reason: str, detail: str = "") -> Record:
        self.counts["dead_letter"] += 1
        return dead_letter(message, dlq_topic=self.topics.events_dead_letter, stage=STAGE, reason=reason, detail=detail)

    def _process_one(self, message: SourceMessage, out: list[Record]) -> None:
        outcome = parse_raw_event(
            message.value(),
            self.teams,
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            broker_timestamp_ms=message.timestamp()[1],
        )
        if isinstance(outcome, DeadLetter):
            out.append(self._dead(message, outcome.reason, outcome.detail))
            return
        if isinstance(outcome, Drop):
            self.counts["dropped"] += 1
            self.counts["warnings"] += 1
            doc = orjson.loads(message.value() or b"{}")
            out.append(
                warning_record(
                    outcome.warning,
                    topic=self.topics.ingestion_warnings,
                    team_id=self.teams.get(doc.get("token") or "", 0),
                    event_uuid=str(outcome.warning.details.get("event_uuid", "")),
                    distinct_id=str(doc.get("distinct_id", ""))[:400],
                    timestamp_us=message.timestamp()[1] * 1000,
                )
            )
            return
        event = outcome.value
        for warning in outcome.warnings:
            self.counts["warnings"] += 1
            out.append(
                warning_record(
                    warning,
                    topic=self.topics.ingestion_warnings,
                    team_id=event.team_id,
                    event_uuid=event.uuid,
                    distinct_id=event.distinct_id,
                    timestamp_us=event.now_us,
                )
            )
        row = to_event_row(event, resolve_person(event))
        key = partition_key(event.team_id, event.distinct_id).encode()
        out.append(Record(self.topics.events_enriched, key, orjson.dumps(row)))
        self.counts["ok"] += 1
