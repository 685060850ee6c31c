-- Top groups by event count, with their current properties
--
-- The groups (companies, say) with the most events in a date range, each with its number of
-- persons, first and last event in the range, and its current properties and created_at, taken
-- from the latest version of the group. `headwater.groups` is a ReplacingMergeTree(version):
-- several versions of a group stay visible until a merge, which may never come, so the view
-- `headwater.groups_latest` picks the latest by argMax(..., version); never FINAL, never a
-- plain SELECT from `groups`. Persons are counted on events_with_person, so users merged into
-- one person count once. `$groupidentify` events (property updates) are not counted.
--
-- Parameters:
--   {team_id:Int64}       the team (project)
--   {group_type:String}   the group type name, e.g. 'company' (its index comes from headwater.group_types)
--   {date_from:Date}      first day (UTC) of the events counted
--   {date_to:Date}        last day (UTC) of the events counted, included
--   {limit:UInt32}        how many groups to return, e.g. 20
--
-- Returns, most events first (ties by group key):
--   group_key String, events UInt64, persons UInt64, first_seen DateTime64(6, 'UTC'),
--   last_seen DateTime64(6, 'UTC'), group_properties Nullable(String) (JSON),
--   created_at Nullable(DateTime64(6, 'UTC')) (both NULL when the group was never identified)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_group_type=company \
--       --param_date_from=2024-01-01 --param_date_to=2024-02-25 --param_limit=20 \
--       --queries-file docs/sql/groups/top_groups.sql
WITH
    (
        SELECT group_type_index
        FROM headwater.group_types
        WHERE team_id = {team_id:Int64} AND group_type = {group_type:String}
        LIMIT 1
    ) AS type_index
SELECT
    e.group_key AS group_key,
    e.events AS events,
    e.persons AS persons,
    e.first_seen AS first_seen,
    e.last_seen AS last_seen,
    g.current_properties AS group_properties,
    g.current_created_at AS created_at
FROM
(
    SELECT
        [`$group_0`, `$group_1`, `$group_2`, `$group_3`, `$group_4`][type_index + 1] AS group_key,
        count() AS events,
        uniqExact(person_id) AS persons,
        min(timestamp) AS first_seen,
        max(timestamp) AS last_seen
    FROM headwater.events_with_person
    WHERE team_id = {team_id:Int64}
        AND toDate(timestamp) BETWEEN {date_from:Date} AND {date_to:Date}
        AND event != '$groupidentify'
        AND group_key != ''
    GROUP BY group_key
    ORDER BY events DESC, group_key
    LIMIT {limit:UInt32}
) AS e
LEFT JOIN
(
    SELECT group_key, group_properties AS current_properties, created_at AS current_created_at
    FROM headwater.groups_latest
    WHERE team_id = {team_id:Int64} AND group_type_index = type_index
) AS g ON g.group_key = e.group_key
ORDER BY events DESC, group_key
SETTINGS join_use_nulls = 1;
