-- Time to convert through a funnel
--
-- For the persons who completed a funnel of 2 to 5 events, how long they took from the first
-- step to the last: the number of converters, and the average, median, shortest and longest
-- conversion time in seconds (microsecond precision).
--
-- Definitions. A person's conversion is the first one they made: the earliest step-1 event from
-- which the next steps can be done in order, each taken at its first occurrence at or after the
-- previous step, with the last step at most {window_seconds} after that step-1 event. Its time is
-- the last step's timestamp minus the step-1 event's. The persons counted are exactly those that
-- ordered_funnel.sql, with the same parameters, reports as reaching the last step. Steps done twice
-- are taken at their first occurrence after the previous step; a repeated step 1 starts a new
-- attempt only if the earlier ones did not convert in time. Persons come from
-- headwater.events_with_person (ids corrected by merges), so a signup made anonymously and a
-- payment made after signing in form one conversion.
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
-- Returns one row:
--   converters UInt64, avg_seconds Nullable(Float64), median_seconds Nullable(Float64)
--   (the mean of the two middle values when converters is even), min_seconds Nullable(Float64),
--   max_seconds Nullable(Float64); the times are NULL when nobody converted
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_steps="['signed_up','created_project','paid']" \
--       --param_window_seconds=604800 --param_date_from=2024-03-04 --param_date_to=2024-03-31 \
--       --queries-file docs/sql/funnels/funnel_conversion_time.sql
SELECT
    count() AS converters,
    avgOrNull(seconds) AS avg_seconds,
    quantileExactInclusiveOrNull(0.5)(seconds) AS median_seconds,
    minOrNull(seconds) AS min_seconds,
    maxOrNull(seconds) AS max_seconds
FROM
(
    WITH
        {steps:Array(String)} AS steps,
        {window_seconds:UInt64} * 1000000 AS window_us,
        -- times[k]: the timestamps (µs) of the person's step-k events, in order
        arrayMap(k -> arraySort(arrayFilter((t, e) -> e = steps[k], ts, names)), range(1, length(steps) + 1)) AS times,
        -- for each step-1 event: when the following steps, each taken at its first occurrence at or
        -- after the previous one, end (0: they never all happen)
        arrayMap(
            s -> arrayFold((acc, k) -> if(acc = 0, toUInt64(0), arrayFirst(t -> t >= acc, times[k])),
                           range(2, length(steps) + 1), s),
            times[1]
        ) AS ends,
        -- the first step-1 event whose steps end within the window
        arrayFirstIndex((s, e) -> e != 0 AND e - s <= window_us, times[1], ends) AS attempt
    SELECT
        person_id,
        (ends[attempt] - times[1][attempt]) / 1e6 AS seconds
    FROM
    (
        SELECT
            person_id,
            groupArray(toUInt64(toUnixTimestamp64Micro(timestamp))) AS ts,
            groupArray(event) AS names
        FROM headwater.events_with_person
        WHERE team_id = {team_id:Int64}
            AND toDate(timestamp) BETWEEN {date_from:Date} AND {date_to:Date}
            AND has({steps:Array(String)}, event)
            -- a scalar subquery runs before any row is read, so bad steps fail even without events
            AND (SELECT throwIf(length({steps:Array(String)}) NOT BETWEEN 2 AND 5
                                OR length(arrayDistinct({steps:Array(String)})) != length({steps:Array(String)}),
                                'funnel_conversion_time.sql takes 2 to 5 distinct steps')) = 0
        GROUP BY person_id
    )
    WHERE attempt > 0
);
