-- An event broken down by one of its properties
--
-- For one event, the values of one of its string properties (`$browser`, `utm_source`, `plan`...)
-- that came with the most events in a date range: for each value, how many events and how many
-- distinct persons. Persons are counted through headwater.events_with_person (person ids
-- corrected by merges), so a visitor who used two distinct ids before signing in counts once.
-- The value is `JSONExtractString(properties, name)`: a string's text; for any other JSON value
-- its JSON text (42 gives '42', true gives 'true'); '' for null and for events without the
-- property, which are all counted together in one row.
--
-- Parameters:
--   {team_id:Int64}       the team (project)
--   {event:String}        the event, e.g. '$pageview'
--   {property:String}     the event property, e.g. '$browser' (case-sensitive, top level)
--   {date_from:Date}      first day (UTC) of the events counted
--   {date_to:Date}        last day (UTC) of the events counted, included
--   {limit:UInt32}        how many values to return, e.g. 10
--
-- Returns the top values, most events first (ties by value):
--   value String, events UInt64, persons UInt64
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_event='$pageview' --param_property='$browser' \
--       --param_date_from=2024-03-04 --param_date_to=2024-03-31 --param_limit=10 \
--       --queries-file docs/sql/trends/breakdown_by_property.sql
SELECT
    JSONExtractString(properties, {property:String}) AS value,
    count() AS events,
    uniqExact(person_id) AS persons
FROM headwater.events_with_person
WHERE team_id = {team_id:Int64}
    AND event = {event:String}
    AND toDate(timestamp) BETWEEN {date_from:Date} AND {date_to:Date}
GROUP BY value
ORDER BY events DESC, value
LIMIT {limit:UInt32};
