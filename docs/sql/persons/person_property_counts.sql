-- Persons per value of a person property
--
-- How many persons have each value of one of their properties (`plan`, `country`,
-- `$initial_utm_source`...), as the properties are now: the latest version of each person, from
-- the view headwater.persons_latest (argMax by version over headwater.persons, a
-- ReplacingMergeTree whose older versions stay visible until a merge that may never come), without
-- deleted persons (a person merged into another is deleted; its properties live on in the other).
-- A plain SELECT from headwater.persons would count every version of every person, deleted ones
-- included.
--
-- The value is `JSONExtractString(properties, name)`: a string's text; for any other JSON value
-- its JSON text (42 gives '42', true gives 'true'); '' for null and for persons without the
-- property, which are all counted together in one row.
--
-- Parameters:
--   {team_id:Int64}       the team (project)
--   {property:String}     the person property, e.g. 'plan' (case-sensitive, top level)
--   {limit:UInt32}        how many values to return, e.g. 20
--
-- Returns the most common values first (ties by value):
--   value String, persons UInt64
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_property=plan --param_limit=20 \
--       --queries-file docs/sql/persons/person_property_counts.sql
SELECT
    JSONExtractString(properties, {property:String}) AS value,
    count() AS persons
FROM headwater.persons_latest
WHERE team_id = {team_id:Int64}
GROUP BY value
ORDER BY persons DESC, value
LIMIT {limit:UInt32};
