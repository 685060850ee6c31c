import json
import uuid
from pathlib import Path

from headwater.topics import ALL_TOPICS, TopicNames
from headwater.wire import PERSON_NAMESPACE, RawEvent, partition_key, person_id_for, raw_event_json_schema

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "headwater" / "schema" / "events_raw.schema.json"


def test_the_design_topics_are_declared_with_their_retention():
    declared = {t.base: t.compacted for t in ALL_TOPICS}
    assert declared == {
        "events_raw": False,
        "events_enriched": False,
        "persons": True,
        "person_distinct_ids": True,
        "groups": True,
        "group_types": True,
        "events_dead_letter": False,
        "ingestion_warnings": False,
        # internal (ADR 0001): the identity stage's messages between partitions and its state
        "identity_inbox": False,
        "identity_changelog": True,
    }
    for spec in ALL_TOPICS:
        assert spec.all_configs()["cleanup.policy"] == ("compact" if spec.compacted else "delete")


def test_topic_names_carry_the_prefix():
    assert TopicNames("acme.").events_raw == "acme.events_raw"
    assert TopicNames().group_types == "group_types"


def test_keying_rule_and_person_id():
    assert partition_key("phc_x", "user 1") == "phc_x:user 1"
    assert partition_key(3, "u") == "3:u"
    assert PERSON_NAMESPACE == uuid.UUID("932979b4-65c3-4424-8467-0b66ec27bc22")
    assert person_id_for(1, "anon") == uuid.uuid5(PERSON_NAMESPACE, "1:anon")


def test_exported_json_schema_matches_the_model():
    assert json.loads(SCHEMA_FILE.read_text()) == raw_event_json_schema(), "run: headwater schema --write headwater/schema/events_raw.schema.json"


def test_schema_names_the_required_fields():
    schema = raw_event_json_schema()
    assert set(schema["required"]) == {"token", "distinct_id", "event"}
    assert {"$set", "$set_once", "uuid", "timestamp", "properties"} <= set(schema["properties"])


def test_model_round_trips_aliases():
    event = RawEvent.model_validate({"token": "t", "distinct_id": "d", "event": "e", "$set": {"a": 1}})
    assert event.to_json_dict()["$set"] == {"a": 1}
