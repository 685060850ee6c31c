-- Sessions (DESIGN.md §5, ADR 0005): one row per (team_id, $session_id), PostHog's raw_sessions.
-- Every event with a $session_id is folded into aggregate states by a materialized view as it is
-- inserted into `events`. The view `sessions` merges the states at read time (the -Merge
-- combinators and GROUP BY), so it is right before any background merge has run.
--
-- Every state is insensitive to duplicates: min, max, argMin/argMax over a key that includes the
-- event uuid, uniqExact of the event uuid, max of a flag. The same event inserted twice (a retried
-- batch, a replayed partition) changes nothing, and so does running the backfill of ADR 0005
-- again.

-- The states of each session. The sort key is the session's identity, because an
-- AggregatingMergeTree merges the rows whose sort key is equal: team first (every query names
-- one team), then the session id. Client session ids are UUIDv7, lower-cased by the processor, so
-- their text sorts by start time and a team's new sessions gather at the end of its key range.
-- Partitions are months of the earliest event of each inserted row, as PostHog partitions by the
-- session's start month: a session spans two partitions only when it crosses a month boundary
-- (or gets an event months late), and the view's GROUP BY puts such rows back together.
--
-- Entry and exit: the key (0 for $pageview and $screen, 1 otherwise, then timestamp and uuid) puts
-- every page or screen view before any other event, so other events only count when the session
-- has no page or screen view. PostHog's prio_ts (the timestamp, moved by one year for other
-- events) does the same for sessions shorter than a year; the flag does it for any. The uuid
-- breaks ties between events of the same microsecond, so the answer depends neither on the
-- insert order nor on merges.
-- The entry state keeps a tuple, so that the entry URL and the UTM fields come from one event.
CREATE TABLE IF NOT EXISTS {db}.sessions_agg {on_cluster}
(
    team_id Int64,
    session_id String,
    first_timestamp SimpleAggregateFunction(min, DateTime64(6, 'UTC')),
    last_timestamp SimpleAggregateFunction(max, DateTime64(6, 'UTC')),
    -- (distinct_id, person_id) of the last event
    last_person_state AggregateFunction(argMax, Tuple(String, UUID), Tuple(DateTime64(6, 'UTC'), UUID)),
    -- (url, utm_source, utm_medium, utm_campaign, referring_domain) of the entry event
    entry_state AggregateFunction(argMin, Tuple(String, String, String, String, String), Tuple(UInt8, DateTime64(6, 'UTC'), UUID)),
    -- url of the exit event (key: 1 for $pageview and $screen, 0 otherwise, timestamp, uuid)
    exit_state AggregateFunction(argMax, String, Tuple(UInt8, DateTime64(6, 'UTC'), UUID)),
    event_uniq AggregateFunction(uniqExact, UUID),
    page_screen_uniq AggregateFunction(uniqExactIf, UUID, UInt8),
    has_autocapture SimpleAggregateFunction(max, UInt8),
    max_inserted_at SimpleAggregateFunction(max, DateTime64(6, 'UTC'))
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(first_timestamp)
ORDER BY (team_id, session_id);

-- Fed by every insert into `events`, one row per session of the inserted block. Any non-empty
-- $session_id forms a session, UUIDv7 or not (PostHog keeps only UUIDv7 ids). The URL of an
-- event is its $current_url, or for a $screen event without one its $screen_name (mobile SDKs
-- send screen names). The properties are parsed once per event, into a named tuple.
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.sessions_mv {on_cluster}
TO {db}.sessions_agg
AS
WITH
    event IN ('$pageview', '$screen') AS is_page_or_screen,
    JSONExtract(
        properties,
        'Tuple(`$current_url` String, `$screen_name` String, utm_source String, utm_medium String, utm_campaign String, `$referring_domain` String)'
    ) AS p,
    if(p.1 = '' AND event = '$screen', p.2, p.1) AS url
SELECT
    team_id,
    `$session_id` AS session_id,
    min(timestamp) AS first_timestamp,
    max(timestamp) AS last_timestamp,
    argMaxState(tuple(distinct_id, person_id), tuple(timestamp, uuid)) AS last_person_state,
    argMinState(tuple(url, p.3, p.4, p.5, p.6), tuple(toUInt8(NOT is_page_or_screen), timestamp, uuid)) AS entry_state,
    argMaxState(url, tuple(toUInt8(is_page_or_screen), timestamp, uuid)) AS exit_state,
    uniqExactState(uuid) AS event_uniq,
    uniqExactIfState(uuid, toUInt8(is_page_or_screen)) AS page_screen_uniq,
    max(toUInt8(event = '$autocapture')) AS has_autocapture,
    max(inserted_at) AS max_inserted_at
FROM {db}.events
WHERE `$session_id` != ''
GROUP BY team_id, session_id;

-- One row per session. Column names and types are fixed when a view is created: a later
-- migration that changes this view must CREATE OR REPLACE it (see 0004).
--   duration_s  dateDiff('second', start, end): the difference of their whole seconds, as PostHog
--   pageviews   distinct $pageview and $screen events
--   events      distinct events of any kind
--   is_bounce   NULL without a page or screen view; otherwise 1 unless the session has more than
--               one of them, or an $autocapture event, or lasts 10 s or more (ADR 0005)
-- Aliases of the inner query differ from the state column names (see persons_latest in 0003).
CREATE VIEW IF NOT EXISTS {db}.sessions {on_cluster} AS
SELECT
    session_id,
    team_id,
    last_person.1 AS distinct_id,
    last_person.2 AS person_id,
    start,
    `end`,
    dateDiff('second', start, `end`) AS duration_s,
    entry.1 AS entry_url,
    exit_url,
    pageviews,
    events,
    if(pageviews = 0, NULL, toUInt8(NOT (pageviews > 1 OR autocaptured = 1 OR duration_s >= 10))) AS is_bounce,
    entry.2 AS entry_utm_source,
    entry.3 AS entry_utm_medium,
    entry.4 AS entry_utm_campaign,
    entry.5 AS entry_referring_domain
FROM
(
    SELECT
        team_id,
        session_id,
        argMaxMerge(last_person_state) AS last_person,
        -- min and max of a SimpleAggregateFunction column keep its type: plain DateTime64 here
        CAST(min(first_timestamp) AS DateTime64(6, 'UTC')) AS start,
        CAST(max(last_timestamp) AS DateTime64(6, 'UTC')) AS `end`,
        argMinMerge(entry_state) AS entry,
        argMaxMerge(exit_state) AS exit_url,
        uniqExactIfMerge(page_screen_uniq) AS pageviews,
        uniqExactMerge(event_uniq) AS events,
        max(has_autocapture) AS autocaptured
    FROM {db}.sessions_agg
    GROUP BY team_id, session_id
);
