-- Bounce rate by entry utm_source
--
-- Which campaigns' visitors leave at once. Sessions are grouped by the utm_source of their entry
-- event (the first $pageview or $screen of the session); '' groups the sessions that entered
-- without one (direct traffic, untagged links). A session bounced when it had exactly one page
-- or screen view, no $autocapture event, and lasted under 10 s (duration_s < 10): the
-- `is_bounce` column of headwater.sessions (ADR 0005). Sessions without any page or screen view
-- (backend-only sessions) have no bounce value and are not counted.
--
-- Parameters:
--   {team_id:Int64}      the team (project)
--   {date_from:Date}     first day (UTC) of the sessions' start
--   {date_to:Date}       last day (UTC) of the sessions' start, included
--
-- Returns one row per entry utm_source, most sessions first (ties by utm_source):
--   utm_source String, sessions UInt64 (sessions with a page or screen view),
--   bounces UInt64, bounce_rate Float64 (bounces / sessions, 4 decimals)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_date_from=2024-03-01 --param_date_to=2024-03-31 \
--       --queries-file docs/sql/sessions/bounce_rate_by_utm_source.sql
SELECT
    entry_utm_source AS utm_source,
    count() AS sessions,
    countIf(is_bounce = 1) AS bounces,
    round(bounces / sessions, 4) AS bounce_rate
FROM headwater.sessions
WHERE team_id = {team_id:Int64}
    AND toDate(start) BETWEEN {date_from:Date} AND {date_to:Date}
    AND is_bounce IS NOT NULL
GROUP BY utm_source
ORDER BY sessions DESC, utm_source;
