-- Groups (DESIGN.md §5), fed by the compacted topics `groups` and `group_types`, and the group
-- creation time of each of the event row's five group slots.

-- The creation time of the group in slot N of the event ($group_N), beside groupN_properties;
-- 0 (1970-01-01) when the slot is empty, and on the rows inserted before this migration.
ALTER TABLE {db}.events {on_cluster}
    ADD COLUMN IF NOT EXISTS group0_created_at DateTime64(6, 'UTC') AFTER group4_properties,
    ADD COLUMN IF NOT EXISTS group1_created_at DateTime64(6, 'UTC') AFTER group0_created_at,
    ADD COLUMN IF NOT EXISTS group2_created_at DateTime64(6, 'UTC') AFTER group1_created_at,
    ADD COLUMN IF NOT EXISTS group3_created_at DateTime64(6, 'UTC') AFTER group2_created_at,
    ADD COLUMN IF NOT EXISTS group4_created_at DateTime64(6, 'UTC') AFTER group3_created_at;

-- A view stores its column list when it is created, so events_with_person (0003) would not show
-- the new columns: the same definition again, replaced atomically. Redo this whenever `events`
-- gains columns.
CREATE OR REPLACE VIEW {db}.events_with_person {on_cluster} AS
SELECT
    e.* REPLACE (if(o.has_override = 1, assumeNotNull(o.override_person_id), e.person_id) AS person_id),
    e.person_id AS original_person_id
FROM {db}.events AS e
LEFT JOIN
(
    SELECT
        team_id,
        distinct_id,
        argMax(tuple(person_id, is_deleted), tuple(version, is_deleted)) AS latest,
        latest.1 AS override_person_id,
        toUInt8(1) AS has_override
    FROM {db}.person_overrides
    GROUP BY team_id, distinct_id
    HAVING latest.2 = 0
) AS o ON e.team_id = o.team_id AND e.distinct_id = o.distinct_id;

-- Groups: one row per group snapshot; a new row with a higher version on every change of its
-- properties. A Kafka tombstone on the topic carries no row (groups are not deleted here).
CREATE TABLE IF NOT EXISTS {db}.groups {on_cluster}
(
    team_id Int64,
    group_type_index UInt8,
    group_key String,
    group_properties String,
    created_at DateTime64(6, 'UTC'),
    version Int64,
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, group_type_index, group_key)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;

-- Group types: a team's group type names and the slot index (0..4) each was given. A type keeps
-- its index for good, so until a merge the duplicates of a (team_id, group_type) carry the same
-- index: SELECT DISTINCT is correct without FINAL.
CREATE TABLE IF NOT EXISTS {db}.group_types {on_cluster}
(
    team_id Int64,
    group_type String,
    group_type_index UInt8,
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree()
ORDER BY (team_id, group_type)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;

-- The latest version of each group, by argMax over a tuple (every column from the same row),
-- correct before any merge. On a version tie the later insert wins, as it does on merge.
-- Aliases differ from column names (see persons_latest in 0003).
CREATE VIEW IF NOT EXISTS {db}.groups_latest {on_cluster} AS
SELECT
    team_id,
    group_type_index,
    group_key,
    latest.1 AS group_properties,
    latest.2 AS created_at,
    latest.3 AS version
FROM
(
    SELECT
        team_id,
        group_type_index,
        group_key,
        argMax(tuple(group_properties, created_at, version), tuple(version, inserted_at)) AS latest
    FROM {db}.groups
    GROUP BY team_id, group_type_index, group_key
);
