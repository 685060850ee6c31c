-- Top entry URLs (landing pages), with their bounce rate and average session duration
--
-- The pages (or app screens) where most sessions begin. A session's entry URL is the
-- `$current_url` of its first $pageview or $screen (for a $screen without one, its
-- `$screen_name`), as in headwater.sessions (ADR 0005). Only sessions with at least one page or
-- screen view count: a backend-only session has no landing page. For each entry URL: the
-- sessions that began there, how many bounced (exactly one page or screen view, no
-- $autocapture, under 10 s), and their average duration in seconds (dateDiff('second', start,
-- end)). The URL is taken as sent, query string included.
--
-- Parameters:
--   {team_id:Int64}      the team (project)
--   {date_from:Date}     first day (UTC) of the sessions' start
--   {date_to:Date}       last day (UTC) of the sessions' start, included
--   {limit:UInt32}       how many entry URLs to return, e.g. 20
--
-- Returns, most sessions first (ties by entry_url):
--   entry_url String, sessions UInt64, bounces UInt64,
--   bounce_rate Float64 (bounces / sessions, 4 decimals), avg_duration_s Float64
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_date_from=2024-03-01 --param_date_to=2024-03-31 \
--       --param_limit=20 --queries-file docs/sql/sessions/top_entry_urls.sql
SELECT
    entry_url,
    count() AS sessions,
    countIf(is_bounce = 1) AS bounces,
    round(bounces / sessions, 4) AS bounce_rate,
    avg(duration_s) AS avg_duration_s
FROM headwater.sessions
WHERE team_id = {team_id:Int64}
    AND toDate(start) BETWEEN {date_from:Date} AND {date_to:Date}
    AND pageviews > 0
GROUP BY entry_url
ORDER BY sessions DESC, entry_url
LIMIT {limit:UInt32};
