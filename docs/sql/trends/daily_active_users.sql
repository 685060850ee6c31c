-- Daily active users
--
-- How many distinct persons were active on each UTC day. A person is active on a day when at
-- least one of their events has a timestamp on that day; `$groupidentify` events (group property
-- updates, often sent by a backend for every company) are not activity. Persons are counted
-- through headwater.events_with_person, whose person_id is corrected by merges: a visitor who was
-- anonymous in the morning and signed in at noon has events under two distinct ids, and events
-- ingested before the merge still carry the anonymous person's id in headwater.events; the view
-- gives them the merged person's id, so that visitor counts once. (Counting
-- `uniqExact(person_id)` on headwater.events would count them twice until the end of time: event
-- rows are never rewritten.) Events of a person deleted since are still counted: they happened.
--
-- Parameters:
--   {team_id:Int64}     the team (project)
--   {date_from:Date}    first day (UTC) reported
--   {date_to:Date}      last day (UTC) reported, included
--
-- Returns one row per day from date_from to date_to, days without any activity included with 0:
--   day Date, active_users UInt64
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_date_from=2024-03-04 --param_date_to=2024-03-31 \
--       --queries-file docs/sql/trends/daily_active_users.sql
SELECT
    toDate(timestamp) AS day,
    uniqExact(person_id) AS active_users
FROM headwater.events_with_person
WHERE team_id = {team_id:Int64}
    AND toDate(timestamp) BETWEEN {date_from:Date} AND {date_to:Date}
    AND event != '$groupidentify'
GROUP BY day
ORDER BY day WITH FILL FROM {date_from:Date} TO {date_to:Date} + 1 STEP 1;
