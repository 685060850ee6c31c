-- Weekly retention of persons
--
-- Of the persons who first did a "start" event in a given week, how many did a "return" event in
-- each of the following weeks. Each person is put in the cohort of the ISO week (Monday, UTC) of
-- their first start event ever (up to the week of date_to); for each cohort and each week offset
-- 0..{weeks}, the query counts the cohort's persons who did the return event at least once in
-- the week cohort + offset. Offset 0 is the cohort week itself: a return event of that week
-- counts whether it came before or after the start event, so offset 0 is not always 100%.
-- The start and return event may be the same (e.g. '$pageview' for both: plain activity
-- retention, where offset 0 is the whole cohort).
--
-- Persons come from headwater.events_with_person, ids corrected by merges: someone who signed up
-- anonymously and comes back signed in (another distinct id, whose events carry the merged
-- person's id) is one retained person, not a cohort member who never returned plus a returning
-- stranger without a cohort.
--
-- Parameters:
--   {team_id:Int64}          the team (project)
--   {start_event:String}     the event that puts a person in a cohort, e.g. 'signed_up'
--   {return_event:String}    the event that counts as coming back, e.g. 'report_viewed'
--   {date_from:Date}         a day of the first cohort week
--   {date_to:Date}           a day of the last week observed: cohorts run up to its week, and no
--                            offset goes past it (the last cohort only has offset 0)
--   {weeks:UInt16}           the last week offset reported (e.g. 8)
--
-- A person whose first start event is before the week of date_from is in no cohort, even when
-- they do it again later.
--
-- Returns one row per (cohort_week, week_offset), offsets without returns included with 0:
--   cohort_week Date, week_offset UInt32, cohort_persons UInt64 (the cohort's size),
--   returned_persons UInt64, retention Float64 (returned_persons / cohort_persons, 4 decimals)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_start_event=signed_up --param_return_event=report_viewed \
--       --param_date_from=2024-03-04 --param_date_to=2024-04-14 --param_weeks=6 \
--       --queries-file docs/sql/retention/weekly_retention.sql
SELECT
    cohort_week,
    week_offset,
    count() AS cohort_persons,
    countIf(has(return_weeks, cohort_week + 7 * week_offset)) AS returned_persons,
    round(returned_persons / cohort_persons, 4) AS retention
FROM
(
    SELECT
        person_id,
        minIf(toStartOfWeek(timestamp, 1), event = {start_event:String}) AS cohort_week,
        groupUniqArrayIf(toStartOfWeek(timestamp, 1), event = {return_event:String}) AS return_weeks
    FROM headwater.events_with_person
    WHERE team_id = {team_id:Int64}
        AND toDate(timestamp) <= toStartOfWeek({date_to:Date}, 1) + 6
        AND event IN ({start_event:String}, {return_event:String})
    GROUP BY person_id
    HAVING countIf(event = {start_event:String}) > 0
        AND cohort_week >= toStartOfWeek({date_from:Date}, 1)
)
-- offsets 0..weeks, but none past the week of date_to
ARRAY JOIN range(toUInt32(least({weeks:UInt16}, intDiv(toStartOfWeek({date_to:Date}, 1) - cohort_week, 7)) + 1))
    AS week_offset
GROUP BY cohort_week, week_offset
ORDER BY cohort_week, week_offset;
