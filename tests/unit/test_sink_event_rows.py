"""The sink's event rows: the uuid read without decoding, the type checks of the slow path, and the
statement of the raw path."""

from __future__ import annotations

import orjson
import pytest

from headwater.rows import EVENT_COLUMNS
from sinks.clickhouse.sink import EVENT_TIME_COLUMNS, event_identity, event_input_insert, event_row
from tests.factories import FakeMessage

UUID = "0190a1b2-0000-7000-8000-000000000001"
PERSON = "0190a1b2-0000-5000-8000-000000000002"


def row(**overrides) -> dict:
    value = {c: "" for c in EVENT_COLUMNS}
    value.update({c: 1_700_000_000_000_000 for c in EVENT_TIME_COLUMNS})
    value.update({"uuid": UUID, "person_id": PERSON, "team_id": 7, "event": "$pageview", "properties": "{}"})
    return {**value, **overrides}


def message(value: dict) -> FakeMessage:
    return FakeMessage(orjson.dumps(value), key=b"7:user", topic="events_enriched")


def test_the_identity_of_a_row_as_the_identity_stage_writes_it_is_read_without_decoding():
    assert event_identity(orjson.dumps(row())) == f"7:{UUID}"
    assert event_identity(orjson.dumps(row(team_id=-12))) == f"-12:{UUID}"
    assert event_identity(orjson.dumps(row(team_id=123456789012))) == f"123456789012:{UUID}"


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"not json",
        orjson.dumps({"team_id": 7, "uuid": UUID}),  # other key order: the slow path reads it
        orjson.dumps(row(uuid=UUID.upper())),  # not canonical: the slow path canonicalizes it
        orjson.dumps(row(uuid="0190a1b2-0000-7000-8000-00000000000z")),
        orjson.dumps(row(team_id="7")),
        orjson.dumps(row(team_id=7.5)),
    ],
)
def test_a_row_written_otherwise_has_no_fast_identity(value):
    assert event_identity(value) is None


def test_a_valid_row_is_checked_into_column_order_with_canonical_uuids():
    value = row(uuid=UUID.upper(), **{"$group_0": "acme", "group0_created_at": 5})
    checked = event_row(message(value))
    assert checked[EVENT_COLUMNS.index("uuid")] == UUID
    assert checked[EVENT_COLUMNS.index("$group_0")] == "acme"
    assert checked[EVENT_COLUMNS.index("group0_created_at")] == 5
    assert len(checked) == len(EVENT_COLUMNS)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"uuid": "nope"}, ValueError),
        ({"person_id": 5}, TypeError),
        ({"team_id": "7"}, TypeError),
        ({"timestamp": 1.5}, TypeError),
        ({"created_at": True}, TypeError),
        ({"timestamp": 1 << 63}, ValueError),
        ({"event": None}, TypeError),
        ({"properties": {"a": 1}}, TypeError),  # a JSON text, not an object
        ({"$session_id": 3}, TypeError),
    ],
)
def test_a_mistyped_row_is_refused_with_the_column_named(overrides, error):
    with pytest.raises(error):
        event_row(message(row(**overrides)))


def test_a_row_missing_a_column_or_not_an_object_is_refused():
    value = row()
    del value["person_created_at"]
    with pytest.raises(KeyError):
        event_row(message(value))
    with pytest.raises(TypeError):
        event_row(FakeMessage(b"[1, 2]", topic="events_enriched"))


def test_the_raw_insert_names_every_column_and_converts_only_the_times():
    statement = event_input_insert("hw.events")
    assert statement.startswith("INSERT INTO hw.events (`uuid`, `team_id`,")
    assert statement.endswith("FORMAT JSONEachRow")
    for column in EVENT_COLUMNS:
        converted = f"fromUnixTimestamp64Micro(`{column}`, 'UTC')"
        assert (converted in statement) == (column in EVENT_TIME_COLUMNS), column
    assert "`uuid` UUID" in statement and "`team_id` Int64" in statement and "`timestamp` Int64" in statement


def test_event_ids_are_sent_as_one_array_literal_and_texts_needing_escapes_are_refused():
    from clickhouse_connect.driver.binding import format_bind_value

    from sinks.clickhouse.sink import TextArray

    ids = [f"7:{UUID}", f"-1:{PERSON}"]
    assert format_bind_value(TextArray(ids)) == format_bind_value(ids).replace(", ", ",") == f"['7:{UUID}','-1:{PERSON}']"
    assert str(TextArray([])) == "[]"
    for bad in ("it's", "back\\slash"):
        with pytest.raises(ValueError):
            TextArray([bad])


def test_in_cluster_mode_inserts_wait_for_the_shards_and_lookups_read_their_own_writes():
    from headwater.settings import Settings
    from sinks.clickhouse.sink import ClickHouseSink

    single = ClickHouseSink(Settings(), client=None)
    cluster = ClickHouseSink(Settings(clickhouse_cluster="main"), client=None)
    try:
        assert single.insert_settings == {"async_insert": 0} and single.lookup_settings == {}
        assert cluster.insert_settings["distributed_foreground_insert"] == 1
        assert cluster.insert_settings["insert_quorum"] == "auto"
        assert cluster.lookup_settings == {"select_sequential_consistency": 1}
    finally:
        for sink in (single, cluster):
            sink.writer.shutdown()
            sink.consumer.close()


def test_a_big_batch_looks_its_uuids_up_in_pieces_small_enough_to_be_read_by_key():
    """Above ~20,000 ids ClickHouse stops reading ``event_uuids`` by key (LOOKUP_IDS)."""
    import uuid as uuid_module
    from types import SimpleNamespace

    from headwater.settings import Settings
    from sinks.clickhouse.sink import LOOKUP_IDS, Batch, ClickHouseSink, event_identity

    class Recorder:
        def __init__(self) -> None:
            self.lookups: list[int] = []
            self.inserted: list[list] = []

        def query(self, sql, parameters, settings):
            self.lookups.append(str(parameters["ids"]).count(",") + 1)
            return SimpleNamespace(result_rows=[])

        def insert(self, table, rows, column_names, settings):
            self.inserted.extend(rows)

    client = Recorder()
    sink = ClickHouseSink(Settings(), client=client)
    try:
        n = 2 * LOOKUP_IDS + 5
        messages = [FakeMessage(orjson.dumps(row(uuid=str(uuid_module.UUID(int=i + 1)))), offset=i, topic="events_enriched")
                    for i in range(n)]
        batch = Batch("events_enriched", 0, 0, n - 1, messages)
        kept = sink._first_carriers([batch], {batch.token: [event_identity(m.value()) for m in messages]})
    finally:
        sink.writer.shutdown()
        sink.consumer.close()
    assert client.lookups == [LOOKUP_IDS, LOOKUP_IDS, 5]
    assert len(kept[batch.token]) == n and len(client.inserted) == n


def test_the_event_batches_of_a_flush_are_checked_together_in_order():
    """One lookup and one event_uuids insert for all partitions' batches; a uuid new to ClickHouse
    that two batches carry is kept in the first only, one known at another offset in neither, and
    one recorded at its own offset (a batch written again) is kept."""
    import uuid as uuid_module
    from types import SimpleNamespace

    from headwater.settings import Settings
    from sinks.clickhouse.sink import Batch, ClickHouseSink

    ids = [str(uuid_module.UUID(int=i + 1)) for i in range(6)]

    class Recorder:
        def __init__(self) -> None:
            self.lookups = 0
            self.inserts: list[tuple[str, list]] = []

        def query(self, sql, parameters, settings):
            self.lookups += 1
            # ids[4] was first carried elsewhere; ids[5] by partition 1 at offset 12 (this batch)
            return SimpleNamespace(result_rows=[(f"7:{ids[4]}", (3, 99)), (f"7:{ids[5]}", (1, 12))])

        def insert(self, table, rows, column_names, settings):
            self.inserts.append((settings["insert_deduplication_token"], rows))

    def batch(partition: int, first: int, uuids: list[str]) -> Batch:
        messages = [FakeMessage(orjson.dumps(row(uuid=u)), offset=first + i, partition=partition, topic="events_enriched")
                    for i, u in enumerate(uuids)]
        return Batch("events_enriched", partition, first, first + len(uuids) - 1, messages)

    client = Recorder()
    sink = ClickHouseSink(Settings(), client=client)
    a, b = batch(0, 10, [ids[0], ids[1], ids[4]]), batch(1, 10, [ids[2], ids[1], ids[5]])
    checked: dict = {}
    try:
        sink._check_events([a, b], checked)
    finally:
        sink.writer.shutdown()
        sink.consumer.close()
    assert [m.offset() for m in checked[a.token][0]] == [10, 11]  # ids[0], ids[1]
    assert [m.offset() for m in checked[b.token][0]] == [10, 12]  # ids[2], ids[5] (its own record)
    assert checked[a.token][1] == checked[b.token][1] == []
    assert client.lookups == 1 and sink.duplicates_dropped == 2
    (token, rows), = client.inserts
    assert token == f"{a.token}+{b.token}:uuids"
    assert sorted(rows) == sorted([[f"7:{ids[0]}", 0, 10], [f"7:{ids[1]}", 0, 11], [f"7:{ids[2]}", 1, 10]])


def test_a_flush_writes_the_event_batches_after_the_other_tables():
    """An event's row is visible only once the rows written beside it are: in one writer job the
    event batches come last, whatever the order in which the partitions' buffers were opened."""
    from headwater.settings import Settings
    from sinks.clickhouse.sink import ClickHouseSink

    sink = ClickHouseSink(Settings(), client=object())
    try:
        jobs = []
        sink.writer.submit = lambda fn, batches: jobs.append(batches)  # capture the job, do not run it
        persons, events = (sink.settings.topic_prefix + "persons", sink.events_topic)
        for topic, partition in ((persons, 1), (events, 0), (persons, 0), (events, 1)):
            sink._buffer(FakeMessage(orjson.dumps(row()), offset=5, partition=partition, topic=topic))
            sink.intents[(topic, partition)] = None  # no previous owner's range to read first
        sink._step(force=True)
    finally:
        sink.writer.shutdown()
        sink.consumer.close()
    (batches,) = jobs
    assert [(b.topic, b.partition) for b in batches] == [(persons, 1), (persons, 0), (events, 0), (events, 1)]


def test_a_flush_makes_one_insert_per_table_that_takes_several_partitions_and_a_replayed_batch_goes_alone():
    """chDB costs 10-40 ms per insert whatever its size: events, persons, distinct ids and groups
    of one flush go in one insert per table; warnings and dead letters keep one per batch, and a
    batch formed again from its previous owner's range goes alone."""
    from headwater.settings import Settings
    from sinks.clickhouse.sink import Batch, ClickHouseSink

    sink = ClickHouseSink(Settings(), client=object())
    try:
        prefix = sink.settings.topic_prefix
        persons, warnings, events = prefix + "persons", prefix + "ingestion_warnings", sink.events_topic

        def batch(topic: str, partition: int, replayed: bool = False) -> Batch:
            return Batch(topic, partition, 0, 0, [FakeMessage(b"{}", topic=topic, partition=partition)], replayed)

        batches = [batch(persons, 1), batch(warnings, 0), batch(persons, 0), batch(warnings, 1),
                   batch(events, 0), batch(events, 2, replayed=True), batch(events, 1)]
        groups = sink._write_groups(batches)
    finally:
        sink.writer.shutdown()
        sink.consumer.close()
    assert [[(b.topic, b.partition) for b in group] for group in groups] == [
        [(persons, 1), (persons, 0)], [(warnings, 0)], [(warnings, 1)], [(events, 0), (events, 1)], [(events, 2)]]


def test_the_event_batches_of_a_flush_are_one_insert_and_a_replayed_batch_leaves_out_what_landed():
    """One insert with the joined token; a replayed batch asks the events table which of its
    events are there (its previous owner may have inserted them beside other partitions' batches,
    under another token) and inserts the others with a token of their own."""
    import uuid as uuid_module
    from types import SimpleNamespace

    from headwater.settings import Settings
    from sinks.clickhouse.sink import Batch, ClickHouseSink

    ids = [str(uuid_module.UUID(int=i + 1)) for i in range(5)]

    class Recorder:
        def __init__(self) -> None:
            self.commands: list[tuple[str, bytes]] = []
            self.queries: list[dict] = []

        def command(self, sql, data, settings):
            self.commands.append((settings["insert_deduplication_token"], data))

        def query(self, sql, parameters, settings):
            self.queries.append(parameters)
            return SimpleNamespace(result_rows=[(7, ids[3])])  # the first attempt put this one in

    def batch(partition: int, uuids: list[str], replayed: bool = False) -> Batch:
        messages = [FakeMessage(orjson.dumps(row(uuid=u, timestamp=1_700_000_000_000_000 + i)), offset=10 + i,
                                partition=partition, topic="events_enriched") for i, u in enumerate(uuids)]
        return Batch("events_enriched", partition, 10, 10 + len(uuids) - 1, messages, replayed)

    client = Recorder()
    sink = ClickHouseSink(Settings(), client=client)
    try:
        a, b = batch(0, ids[:2]), batch(1, ids[2:3])
        sink._write_events([a, b], {a.token: (a.messages, []), b.token: (b.messages, [])})
        assert client.queries == []  # a fresh batch is not looked up
        replay = batch(2, ids[3:], replayed=True)
        sink._write_events([replay], {replay.token: (replay.messages, [])})
    finally:
        sink.writer.shutdown()
        sink.consumer.close()
    (token, data), (replay_token, replay_data) = client.commands
    assert token == f"{a.token}+{b.token}"
    assert [orjson.loads(line)["uuid"] for line in data.split(b"\n")] == ids[:3]
    (asked,) = client.queries
    assert sorted(str(asked["uuids"]).strip("[]").replace("'", "").split(",")) == sorted(ids[3:])
    assert (asked["low"], asked["high"]) == (1_700_000_000_000_000, 1_700_000_000_000_001)
    assert [orjson.loads(line)["uuid"] for line in replay_data.split(b"\n")] == [ids[4]]
    assert replay_token.startswith(f"{replay.token}:replay:") and replay_token != replay.token
    assert sink.rows_written[f"{sink.database}.events"] == 4


def test_a_write_waiting_for_clickhouse_gives_up_after_a_revocation_even_if_its_partitions_came_back():
    """A write that joins several partitions must not land after one of them changed hands: the
    new owner replays that range, leaving out only what it finds in ClickHouse."""
    from headwater.settings import Settings
    from sinks.clickhouse.sink import Abandoned, ClickHouseSink

    sink = ClickHouseSink(Settings(), client=object())
    key = (sink.events_topic, 0)
    sink.assigned.add(key)
    attempts = []

    def failing_until_the_third_attempt() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            sink.revocations += 1  # a rebalance took the partition away and gave it back meanwhile
        if len(attempts) < 3:
            raise OSError("ClickHouse is down")

    try:
        with pytest.raises(Abandoned):
            sink._retry("insert", failing_until_the_third_attempt, [key], since=sink.revocations)
        attempts.clear()
        sink._retry("insert", failing_until_the_third_attempt, [key])  # no `since`: retried to the end
    finally:
        sink.writer.shutdown()
        sink.consumer.close()
    assert len(attempts) == 3


def test_the_settlers_records_are_no_rows_but_their_offsets_are_in_the_batch():
    """On Tansu the settler commits a transaction with one record (key ``__settle__``, no value) on
    a partition where a transaction was left prepared (ADR 0015): no row, and no dead letter, but the
    batch's range covers it so its offset is committed."""
    from headwater.settings import Settings
    from headwater.tansu import SETTLE_KEY
    from sinks.clickhouse.sink import ClickHouseSink

    sink = ClickHouseSink(Settings(), client=object())
    try:
        jobs = []
        sink.writer.submit = lambda fn, batches: jobs.append(batches)  # capture the job, do not run it
        topic = sink.events_topic
        sink.intents[(topic, 0)] = None
        for offset, key, value in ((5, b"7:user", orjson.dumps(row())), (6, SETTLE_KEY, None)):
            sink._buffer(FakeMessage(value, key=key, offset=offset, topic=topic))
        sink._step(force=True)
    finally:
        sink.writer.shutdown()
        sink.consumer.close()
    (batches,) = jobs
    (batch,) = batches
    assert (batch.first, batch.last) == (5, 6)
    assert [m.offset() for m in batch.messages] == [5]
