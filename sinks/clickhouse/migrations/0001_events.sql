-- Events: one row per ingested event (DESIGN.md §5). Duplicate inserts are refused by
-- insert_deduplication_token; ReplacingMergeTree is a second line of defence on merge.
CREATE TABLE IF NOT EXISTS {db}.events {on_cluster}
(
    uuid UUID,
    team_id Int64,
    event String,
    distinct_id String,
    person_id UUID,
    timestamp DateTime64(6, 'UTC'),
    properties String,
    person_properties String,
    person_created_at DateTime64(6, 'UTC'),
    `$group_0` String,
    `$group_1` String,
    `$group_2` String,
    `$group_3` String,
    `$group_4` String,
    group0_properties String,
    group1_properties String,
    group2_properties String,
    group3_properties String,
    group4_properties String,
    `$session_id` String,
    `$window_id` String,
    created_at DateTime64(6, 'UTC'),
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(uuid))
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;
