-- Daily counts of a list of events
--
-- How many times each of a few events happened on each UTC day: the "total count" trend of one
-- or more series. Every event row counts (a person who does it five times counts five); see
-- daily_active_users.sql for distinct persons. The rows form a full grid, every day of the range
-- times every event of the list, with 0 where nothing happened, so that a chart gets no gaps.
-- Event names are compared exactly (case-sensitive); a name given twice is reported once.
--
-- Parameters:
--   {team_id:Int64}          the team (project)
--   {events:Array(String)}   the event names, e.g. ['$pageview', 'signed_up']
--   {date_from:Date}         first day (UTC) reported
--   {date_to:Date}           last day (UTC) reported, included
--
-- Returns one row per (day, event), by day, then in the order of the list:
--   day Date, event String, events UInt64
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_events="['\$pageview','signed_up']" \
--       --param_date_from=2024-03-04 --param_date_to=2024-03-31 \
--       --queries-file docs/sql/trends/event_counts_by_day.sql
WITH arrayDistinct({events:Array(String)}) AS wanted
SELECT
    grid.day AS day,
    grid.event AS event,
    counts.n AS events
FROM
(
    -- every day of the range times every event of the list
    SELECT
        arrayJoin(arrayMap(i -> {date_from:Date} + i,
                           range(toUInt32(greatest(dateDiff('day', {date_from:Date}, {date_to:Date}) + 1, 0))))) AS day,
        arrayJoin(wanted) AS event
) AS grid
LEFT JOIN
(
    SELECT toDate(timestamp) AS day, event, count() AS n
    FROM headwater.events
    WHERE team_id = {team_id:Int64}
        AND toDate(timestamp) BETWEEN {date_from:Date} AND {date_to:Date}
        AND has(wanted, event)
    GROUP BY day, event
) AS counts ON counts.day = grid.day AND counts.event = grid.event
ORDER BY day, indexOf(wanted, event)
SETTINGS join_use_nulls = 0;
