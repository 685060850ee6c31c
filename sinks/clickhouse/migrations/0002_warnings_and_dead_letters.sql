-- Ingestion warnings: events that were ingested with a caveat, or dropped on purpose.
CREATE TABLE IF NOT EXISTS {db}.ingestion_warnings {on_cluster}
(
    team_id Int64,
    type LowCardinality(String),
    event_uuid String,
    distinct_id String,
    details String,
    timestamp DateTime64(6, 'UTC'),
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, type, timestamp)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;

-- Dead letters: the refused messages, byte for byte, with the reason and where they came from.
CREATE TABLE IF NOT EXISTS {db}.events_dead_letter {on_cluster}
(
    reason LowCardinality(String),
    detail String,
    stage LowCardinality(String),
    source_topic String,
    source_partition UInt32,
    source_offset UInt64,
    dead_lettered_at DateTime64(3, 'UTC'),
    key String,
    raw String,
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree()
ORDER BY (source_topic, source_partition, source_offset)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;
