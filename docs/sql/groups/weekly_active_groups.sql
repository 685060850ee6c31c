-- Weekly active groups
--
-- How many distinct groups of one type (companies, say) were active in each ISO week (Monday to
-- Sunday, UTC). A group is active in a week when at least one event of that week carries its key in
-- `$group_N`, N being the index the team gave the group type. `$groupidentify` events only update
-- a group's properties (a CRM sync can send them for every company every night), so they do not
-- count as activity.
--
-- Parameters:
--   {team_id:Int64}       the team (project)
--   {group_type:String}   the group type name, e.g. 'company' (its index comes from headwater.group_types)
--   {date_from:Date}      a day of the first week reported (the whole week is counted)
--   {date_to:Date}        a day of the last week reported (the whole week is counted)
--
-- Returns one row per week, from the week of date_from to the week of date_to, weeks without any
-- activity included with 0 (and every week 0 when the team has no such group type):
--   week Date (its Monday), active_groups UInt64
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_group_type=company \
--       --param_date_from=2024-01-01 --param_date_to=2024-02-25 \
--       --queries-file docs/sql/groups/weekly_active_groups.sql
WITH
    (
        SELECT group_type_index
        FROM headwater.group_types
        WHERE team_id = {team_id:Int64} AND group_type = {group_type:String}
        LIMIT 1
    ) AS type_index,
    [`$group_0`, `$group_1`, `$group_2`, `$group_3`, `$group_4`][type_index + 1] AS group_key
SELECT
    toStartOfWeek(timestamp, 1) AS week,
    uniqExact(group_key) AS active_groups
FROM headwater.events
WHERE team_id = {team_id:Int64}
    AND toDate(timestamp) BETWEEN toStartOfWeek({date_from:Date}, 1) AND toStartOfWeek({date_to:Date}, 1) + 6
    AND event != '$groupidentify'
    AND group_key != ''
GROUP BY week
ORDER BY week WITH FILL
    FROM toStartOfWeek({date_from:Date}, 1)
    TO toStartOfWeek({date_to:Date}, 1) + 7
    STEP toIntervalWeek(1);
