-- Average session duration, per day and overall
--
-- How long sessions last, on average, for each UTC day and over the whole range. A session is
-- counted on the day it starts (`start`, its first event), even when it runs past midnight, and
-- lasts `duration_s` = dateDiff('second', start, end): the seconds from its first to its last
-- event, counted as ClickHouse and PostHog count them (second boundaries crossed, so 0.9 s across
-- a boundary is 1). Every session counts, with or without page views (sessions of backend events
-- too); add `AND pageviews > 0` to the WHERE clause for web and app visits only.
--
-- The overall average is over all the range's sessions, not the mean of the daily averages.
-- headwater.sessions merges the session states at read time: correct before any merge.
--
-- Parameters:
--   {team_id:Int64}      the team (project)
--   {date_from:Date}     first day (UTC) of the sessions' start
--   {date_to:Date}       last day (UTC) of the sessions' start, included
--
-- Returns one row per day with sessions (days without any are absent), in order, then the
-- overall row, whose day is NULL:
--   day Nullable(Date), sessions UInt64, avg_duration_s Float64
-- (with no session at all in the range: only the overall row, sessions 0 and avg_duration_s nan)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_date_from=2024-03-01 --param_date_to=2024-03-31 \
--       --queries-file docs/sql/sessions/session_duration.sql
SELECT
    toDate(start) AS day,
    count() AS sessions,
    avg(duration_s) AS avg_duration_s
FROM headwater.sessions
WHERE team_id = {team_id:Int64}
    AND toDate(start) BETWEEN {date_from:Date} AND {date_to:Date}
GROUP BY GROUPING SETS ((day), ())
ORDER BY day ASC NULLS LAST
SETTINGS group_by_use_nulls = 1;
