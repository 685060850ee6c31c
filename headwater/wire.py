"""Wire models: what travels on the topics, and the one keying rule.

``RawEvent`` is the public envelope of ``events_raw``: other services produce against its JSON
Schema (``headwater/schema/events_raw.schema.json``, exported by ``headwater schema``). The
processors do not validate their own internal messages with pydantic; they check raw input with
plain code (``processors.identity.steps.parse``) that follows this model.
"""

from __future__ import annotations

import uuid as uuid_mod
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Namespace of deterministic person ids: ``uuid5(PERSON_NAMESPACE, f"{team_id}:{distinct_id}")``.
PERSON_NAMESPACE = uuid_mod.UUID("932979b4-65c3-4424-8467-0b66ec27bc22")
#: Namespace of uuids derived for raw messages that came without one (from their coordinates).
MESSAGE_NAMESPACE = uuid_mod.UUID("5f0c6f8e-2a7e-4f55-9a55-6f2d1f3c8e11")

MAX_DISTINCT_ID_CHARS = 400
MAX_EVENT_NAME_CHARS = 200


def partition_key(token_or_team: str | int, distinct_id: str) -> str:
    """The keying rule of every per-distinct_id topic: ``"{token_or_team}:{distinct_id}"``."""
    return f"{token_or_team}:{distinct_id}"


def person_id_for(team_id: int, distinct_id: str) -> uuid_mod.UUID:
    """The deterministic person id of a distinct_id that was never merged."""
    return uuid_mod.uuid5(PERSON_NAMESPACE, f"{team_id}:{distinct_id}")


class RawEvent(BaseModel):
    """One event as published on ``events_raw`` (key ``token:distinct_id``, value this JSON).

    Unknown top-level fields are kept and ignored. ``uuid`` identifies the event for
    deduplication: send the same uuid again when retrying. Without one, headwater derives it
    from the message's topic, partition and offset, so a replay yields the same id.
    """

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    token: str = Field(min_length=1, description="Project token (api key); names the team.")
    distinct_id: str = Field(
        min_length=1,
        max_length=MAX_DISTINCT_ID_CHARS,
        description="The user or device the event is about; not only whitespace.",
    )
    event: str = Field(min_length=1, description="Event name, e.g. $pageview, $identify, signed_up.")
    uuid: uuid_mod.UUID | None = Field(default=None, description="Event id, used for deduplication.")
    timestamp: datetime | None = Field(
        default=None, description="When it happened (ISO 8601, UTC if naive); default: `now`."
    )
    properties: dict[str, Any] = Field(default_factory=dict)
    set: dict[str, Any] | None = Field(default=None, alias="$set", description="Person properties to set.")
    set_once: dict[str, Any] | None = Field(
        default=None, alias="$set_once", description="Person properties to set if absent."
    )
    sent_at: datetime | None = Field(default=None, description="Client send time (capture skew correction).")
    now: datetime | None = Field(default=None, description="When headwater (or your service) received it.")
    ip: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def raw_event_json_schema() -> dict[str, Any]:
    schema = RawEvent.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://headwater.dev/schema/events_raw.schema.json"
    schema["description"] = (
        "Value of a message on the events_raw topic. Key: 'token:distinct_id' (UTF-8). "
        + (schema.get("description") or "")
    ).strip()
    return schema
