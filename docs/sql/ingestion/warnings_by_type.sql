-- Ingestion warnings by team and type
--
-- What was ingested with a caveat (or dropped on purpose) over a time range: for each team and
-- warning type (`cannot_merge_already_identified`, `ignored_invalid_timestamp`,
-- `invalid_process_person_profile`...), how many warnings, how many distinct events and distinct
-- ids they concern, when the first and last were raised, and the details of the latest one (a JSON
-- object whose keys depend on the type), with its event uuid and distinct id.
--
-- This query covers every team, team by team, to see at a glance which projects send bad data;
-- add `AND team_id = {team_id:Int64}` to the WHERE clause for one.
--
-- Parameters:
--   {time_from:DateTime('UTC')}  start of the range (included), on the warning's `timestamp` (when capture
--                                received the event), e.g. '2024-03-01 00:00:00'
--   {time_to:DateTime('UTC')}    end of the range (excluded), e.g. '2024-04-01 00:00:00'
--
-- Returns one row per (team_id, type), by team, then most warnings first (ties by type):
--   team_id Int64, type String, warnings UInt64, events UInt64 (distinct event uuids),
--   distinct_ids UInt64, first_at DateTime64(6, 'UTC'), last_at DateTime64(6, 'UTC'),
--   latest_details String (JSON), latest_event_uuid String, latest_distinct_id String
--
-- Run:
--   clickhouse-client --param_time_from='2024-03-01 00:00:00' --param_time_to='2024-04-01 00:00:00' \
--       --queries-file docs/sql/ingestion/warnings_by_type.sql
WITH
    -- the latest warning of the group, every field from the same row (ties by event uuid, then details)
    argMax(tuple(details, event_uuid, distinct_id), tuple(timestamp, event_uuid, details)) AS latest
SELECT
    team_id,
    type,
    count() AS warnings,
    uniqExact(event_uuid) AS events,
    uniqExact(distinct_id) AS distinct_ids,
    min(timestamp) AS first_at,
    max(timestamp) AS last_at,
    latest.1 AS latest_details,
    latest.2 AS latest_event_uuid,
    latest.3 AS latest_distinct_id
FROM headwater.ingestion_warnings
WHERE timestamp >= {time_from:DateTime('UTC')}
    AND timestamp < {time_to:DateTime('UTC')}
GROUP BY team_id, type
ORDER BY team_id, warnings DESC, type;
