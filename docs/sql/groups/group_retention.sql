-- Account-level retention: weekly cohorts of groups
--
-- How long groups (customers, companies) keep using the product before churning. Each group is
-- put in the cohort of the ISO week (Monday, UTC) of its first event ever; for each cohort and
-- each week offset 0..{weeks} after the cohort week, the query counts the cohort's groups that were
-- active in that week. Offset 0 is the cohort itself (every group is active in its first week).
-- A group is active in a week when at least one event of the week carries its key in `$group_N`
-- (N: the type's index for the team); `$groupidentify` events (property updates) are not activity.
-- Events of any of the group's users count: the group, not the person, is retained.
--
-- Parameters:
--   {team_id:Int64}       the team (project)
--   {group_type:String}   the group type name, e.g. 'company' (its index comes from headwater.group_types)
--   {date_from:Date}      a day of the first cohort week
--   {date_to:Date}        a day of the last week observed: cohorts run up to its week, and no
--                         offset goes past it (the last cohort only has offset 0)
--   {weeks:UInt16}        the last week offset reported (e.g. 8)
--
-- A group whose first event is before the week of date_from is in no cohort, even when it is
-- active later.
--
-- Returns one row per (cohort_week, week_offset), offsets without activity included with 0:
--   cohort_week Date, week_offset UInt32, cohort_groups UInt64 (the cohort's size),
--   active_groups UInt64, retention Float64 (active_groups / cohort_groups, 4 decimals)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_group_type=company \
--       --param_date_from=2024-01-01 --param_date_to=2024-02-25 --param_weeks=8 \
--       --queries-file docs/sql/groups/group_retention.sql
SELECT
    cohort_week,
    week_offset,
    count() AS cohort_groups,
    countIf(has(active_weeks, cohort_week + 7 * week_offset)) AS active_groups,
    round(active_groups / cohort_groups, 4) AS retention
FROM
(
    WITH
        (
            SELECT group_type_index
            FROM headwater.group_types
            WHERE team_id = {team_id:Int64} AND group_type = {group_type:String}
            LIMIT 1
        ) AS type_index,
        [`$group_0`, `$group_1`, `$group_2`, `$group_3`, `$group_4`][type_index + 1] AS group_key
    SELECT
        group_key,
        groupUniqArray(toStartOfWeek(timestamp, 1)) AS active_weeks,
        arrayMin(active_weeks) AS cohort_week
    FROM headwater.events
    WHERE team_id = {team_id:Int64}
        AND toDate(timestamp) <= toStartOfWeek({date_to:Date}, 1) + 6
        AND event != '$groupidentify'
        AND group_key != ''
    GROUP BY group_key
    HAVING cohort_week >= toStartOfWeek({date_from:Date}, 1)
)
-- offsets 0..weeks, but none past the week of date_to
ARRAY JOIN range(toUInt32(least({weeks:UInt16}, intDiv(toStartOfWeek({date_to:Date}, 1) - cohort_week, 7)) + 1))
    AS week_offset
GROUP BY cohort_week, week_offset
ORDER BY cohort_week, week_offset;
