-- Funnel counted per group
--
-- How many groups (companies, say) reached each step of a funnel of 2 to 5 events. A group
-- converts when events of the group, from any of its users, happen in the order of the steps with
-- the last one at most {window_seconds} after the first (windowFunnel over the group's events,
-- microsecond timestamps, the bound included). Every step is counted as "reached step k or
-- further", so the numbers never go up from one step to the next.
--
-- Parameters:
--   {team_id:Int64}          the team (project)
--   {group_type:String}      the group type name, e.g. 'company' (its index comes from headwater.group_types)
--   {steps:Array(String)}    the event names of the steps, in order, 2 to 5 of them,
--                            e.g. ['signed_up', 'invited_teammate', 'paid']
--   {window_seconds:UInt64}  the conversion window, e.g. 1209600 (14 days)
--   {date_from:Date}         first day (UTC) of the events considered
--   {date_to:Date}           last day (UTC) of the events considered, included; every step must
--                            happen within [date_from, date_to]
--
-- Returns one row per step (no rows when no group had any of the steps' events):
--   step UInt8 (1-based), step_event String, groups UInt64 (groups that reached the step),
--   conversion Float64 (groups / groups of step 1, 4 decimals)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_group_type=company \
--       --param_steps="['signed_up','invited_teammate','paid']" --param_window_seconds=1209600 \
--       --param_date_from=2024-01-01 --param_date_to=2024-02-25 \
--       --queries-file docs/sql/groups/group_funnel.sql
WITH {steps:Array(String)} AS steps
SELECT
    step,
    steps[step] AS step_event,
    countIf(level >= step) AS groups,
    round(groups / countIf(level >= 1), 4) AS conversion
FROM
(
    WITH
        {steps:Array(String)} AS steps,
        (
            SELECT group_type_index
            FROM headwater.group_types
            WHERE team_id = {team_id:Int64} AND group_type = {group_type:String}
            LIMIT 1
        ) AS type_index,
        [`$group_0`, `$group_1`, `$group_2`, `$group_3`, `$group_4`][type_index + 1] AS group_key
    SELECT
        group_key,
        -- windowFunnel takes Date, DateTime or an unsigned number, not DateTime64: microseconds.
        -- steps[k] is '' past the array's end, which no event is named.
        windowFunnel({window_seconds:UInt64} * 1000000)(
            toUInt64(toUnixTimestamp64Micro(timestamp)),
            event = steps[1], event = steps[2], event = steps[3], event = steps[4], event = steps[5]
        ) AS level
    FROM headwater.events
    WHERE team_id = {team_id:Int64}
        AND toDate(timestamp) BETWEEN {date_from:Date} AND {date_to:Date}
        AND has(steps, event)
        AND group_key != ''
        AND throwIf(length(steps) NOT BETWEEN 2 AND 5, 'group_funnel.sql takes 2 to 5 steps') = 0
    GROUP BY group_key
)
ARRAY JOIN arrayMap(k -> toUInt8(k), range(1, length(steps) + 1)) AS step
GROUP BY step
ORDER BY step;
