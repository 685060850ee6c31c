-- Person identity (DESIGN.md §5), fed by the compacted topics `persons` and `person_distinct_ids`.
-- Every write is a new row with a higher version; ReplacingMergeTree(version) keeps the latest on
-- merge, but merges happen whenever they happen, so the views below pick the latest row by
-- argMax(..., version) and never rely on FINAL or on merges having run.

-- Persons: one row per person snapshot. A deleted person's last snapshot has is_deleted = 1 (the
-- Kafka tombstone that follows it on the topic carries no row).
CREATE TABLE IF NOT EXISTS {db}.persons {on_cluster}
(
    id UUID,
    team_id Int64,
    properties String,
    is_identified UInt8,
    created_at DateTime64(6, 'UTC'),
    version Int64,
    is_deleted UInt8,
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, id)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;

-- Distinct ids: which person a distinct_id belongs to. Version 0 when the person was created
-- with it; higher versions when a merge re-pointed it to another person.
CREATE TABLE IF NOT EXISTS {db}.person_distinct_ids {on_cluster}
(
    team_id Int64,
    distinct_id String,
    person_id UUID,
    version Int64,
    is_deleted UInt8,
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, distinct_id)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;

-- Overrides: the distinct-id rows with version > 0 (re-pointed by a merge), PostHog's
-- person_distinct_id_overrides. Small, so events can be corrected by a join at query time.
CREATE TABLE IF NOT EXISTS {db}.person_overrides {on_cluster}
(
    team_id Int64,
    distinct_id String,
    person_id UUID,
    version Int64,
    is_deleted UInt8,
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, distinct_id)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.person_overrides_mv {on_cluster}
TO {db}.person_overrides
AS SELECT team_id, distinct_id, person_id, version, is_deleted, inserted_at
FROM {db}.person_distinct_ids
WHERE version > 0;

-- The latest version of each person, without the persons whose latest version is deleted.
-- One argMax over a tuple, so every column comes from the same row; on a version tie the
-- deleted row wins. Aliases differ from column names: in ClickHouse an alias is visible in the
-- whole SELECT, so `max(version) AS version` would change what argMax(..., version) means.
CREATE VIEW IF NOT EXISTS {db}.persons_latest {on_cluster} AS
SELECT
    id,
    team_id,
    latest.1 AS properties,
    latest.2 AS is_identified,
    latest.3 AS created_at,
    latest.4 AS version
FROM
(
    SELECT
        team_id,
        id,
        argMax(tuple(properties, is_identified, created_at, version, is_deleted), tuple(version, is_deleted)) AS latest
    FROM {db}.persons
    GROUP BY team_id, id
)
WHERE latest.5 = 0;

-- Events with person_id corrected through person_overrides: the latest override of the event's
-- (team_id, distinct_id) when there is one (and it is not deleted), else the event's own
-- person_id, which stays available as original_person_id. `has_override` tells a match from
-- the LEFT JOIN's default values (a zero UUID, or NULL under join_use_nulls = 1).
CREATE VIEW IF NOT EXISTS {db}.events_with_person {on_cluster} AS
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
