-- The sink's bookkeeping for effectively-once (ADR 0007). Neither table is for analysts.

-- One row per source (topic, partition): the offset range of the batch the sink is writing or
-- wrote last. It is written before the batch's insert. A sink that takes the partition over and
-- finds the range starting at its committed offset forms exactly the same batch again, with the
-- same insert_deduplication_token, so ClickHouse refuses it if the first attempt landed.
-- EmbeddedRocksDB: an insert of an existing key replaces the row (an upsert), reads by key are
-- point lookups. In cluster mode this table is a KeeperMap, which all servers share.
CREATE TABLE IF NOT EXISTS {db}.sink_batches {on_cluster}
(
    source String,
    first_offset UInt64,
    last_offset UInt64,
    written_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = EmbeddedRocksDB
PRIMARY KEY source;

-- The event uuids seen in the last two hours, per team ("{team_id}:{uuid}"), with the
-- events_enriched offset that first carried each. The sink drops an event whose uuid was first
-- carried at another offset: a client that sent it again (SDKs retry with the same uuid). The
-- first carrier itself (a replayed batch) is kept. Entries live at least 7,200 s (RocksDB's TTL
-- removes them at compaction, never earlier), so the dedup window is at least two hours.
CREATE TABLE IF NOT EXISTS {db}.event_uuids {on_cluster}
(
    id String,
    source_partition UInt32,
    source_offset UInt64,
    seen_at DateTime DEFAULT now()
)
ENGINE = EmbeddedRocksDB(7200)
PRIMARY KEY id;
