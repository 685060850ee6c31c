-- Ordered funnel of persons
--
-- How many persons reached each step of a funnel of 2 to 5 events, done in the order of the steps
-- with the last one at most {window_seconds} after the first (windowFunnel over each person's
-- events, microsecond timestamps, the bound included). A step is "reached" when the steps before
-- it were done in order within the window; each step's count is "reached this step or a later
-- one", so the numbers never go up from one step to the next. Doing a step twice changes nothing;
-- a step done before the previous one does not count; two steps in the same microsecond count as
-- done in the order of the steps.
--
-- Persons come from headwater.events_with_person, person ids corrected by merges: a visitor who
-- signs up while anonymous and pays after signing in (another distinct id) is one person who
-- converted, even though the signup's row in headwater.events still carries the anonymous
-- person's id.
--
-- Parameters:
--   {team_id:Int64}          the team (project)
--   {steps:Array(String)}    the event names of the steps, in order, 2 to 5 distinct names,
--                            e.g. ['signed_up', 'created_project', 'paid']
--   {window_seconds:UInt64}  the conversion window, e.g. 604800 (7 days)
--   {date_from:Date}         first day (UTC) of the events considered
--   {date_to:Date}           last day (UTC) of the events considered, included; every step must
--                            happen within [date_from, date_to]
--
-- Returns one row per step (no rows when nobody did any of the steps' events; when some did later
-- steps but nobody step 1, every step has 0 persons and conversion nan):
--   step UInt8 (1-based), step_event String, persons UInt64 (persons who reached the step),
--   conversion Float64 (persons / persons of step 1, 4 decimals),
--   from_previous Float64 (persons / persons of the step before, 4 decimals; 1 for step 1)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_steps="['signed_up','created_project','paid']" \
--       --param_window_seconds=604800 --param_date_from=2024-03-04 --param_date_to=2024-03-31 \
--       --queries-file docs/sql/funnels/ordered_funnel.sql
WITH {steps:Array(String)} AS steps
SELECT
    step,
    steps[step] AS step_event,
    countIf(level >= step) AS persons,
    round(persons / countIf(level >= 1), 4) AS conversion,
    round(persons / countIf(level >= greatest(step - 1, 1)), 4) AS from_previous
FROM
(
    WITH {steps:Array(String)} AS steps
    SELECT
        person_id,
        -- windowFunnel takes Date, DateTime or an unsigned number, not DateTime64: microseconds.
        -- steps[k] is '' past the array's end, which no event is named.
        windowFunnel({window_seconds:UInt64} * 1000000)(
            toUInt64(toUnixTimestamp64Micro(timestamp)),
            event = steps[1], event = steps[2], event = steps[3], event = steps[4], event = steps[5]
        ) AS level
    FROM headwater.events_with_person
    WHERE team_id = {team_id:Int64}
        AND toDate(timestamp) BETWEEN {date_from:Date} AND {date_to:Date}
        AND has(steps, event)
        -- a scalar subquery runs before any row is read, so bad steps fail even without events
        AND (SELECT throwIf(length(steps) NOT BETWEEN 2 AND 5 OR length(arrayDistinct(steps)) != length(steps),
                            'ordered_funnel.sql takes 2 to 5 distinct steps')) = 0
    GROUP BY person_id
)
ARRAY JOIN arrayMap(k -> toUInt8(k), range(1, length(steps) + 1)) AS step
GROUP BY step
ORDER BY step;
