-- Dead letters by reason and stage
--
-- What was refused, where and why, over a time range: headwater.events_dead_letter holds every
-- refused message byte for byte, with the reason (`invalid_json`, `invalid_distinct_id`,
-- `event_row_too_large`, `processing_error`, `sink_unreadable_row`...) and the stage that refused
-- it (`identity`, `sink`...). For each (reason, stage): how many messages, when the first and last
-- were refused, and the latest one as an example (its detail, its source coordinates and its first
-- 1,000 characters).
--
-- A dead letter is one source message, identified by (source_topic, source_partition,
-- source_offset), the table's sort key. A message refused again after a restart (its batch
-- replayed) is a second row with the same coordinates until a background merge removes it, so
-- the query counts distinct coordinates, not rows.
--
-- This query covers every team: a refused message may not have a readable team at all.
--
-- Parameters:
--   {time_from:DateTime('UTC')}  start of the range (included), on `dead_lettered_at`, e.g. '2024-03-01 00:00:00'
--   {time_to:DateTime('UTC')}    end of the range (excluded), e.g. '2024-04-01 00:00:00'
--
-- Returns one row per (reason, stage), most dead letters first (ties by reason, stage):
--   reason String, stage String, dead_letters UInt64, first_at DateTime64(3, 'UTC'),
--   last_at DateTime64(3, 'UTC'), example_detail String, example_source String
--   ('topic/partition@offset'), example_raw String (the first 1,000 characters of the message)
--
-- Run:
--   clickhouse-client --param_time_from='2024-03-01 00:00:00' --param_time_to='2024-04-01 00:00:00' \
--       --queries-file docs/sql/ingestion/dead_letters_by_reason.sql
WITH
    -- the latest dead letter of the group, every field from the same row (ties by source coordinates)
    argMax(tuple(detail, source_topic, source_partition, source_offset, raw),
           tuple(dead_lettered_at, source_topic, source_partition, source_offset)) AS example
SELECT
    reason,
    stage,
    uniqExact(source_topic, source_partition, source_offset) AS dead_letters,
    min(dead_lettered_at) AS first_at,
    max(dead_lettered_at) AS last_at,
    example.1 AS example_detail,
    concat(example.2, '/', toString(example.3), '@', toString(example.4)) AS example_source,
    substringUTF8(example.5, 1, 1000) AS example_raw
FROM headwater.events_dead_letter
WHERE dead_lettered_at >= {time_from:DateTime('UTC')}
    AND dead_lettered_at < {time_to:DateTime('UTC')}
GROUP BY reason, stage
ORDER BY dead_letters DESC, reason, stage;
