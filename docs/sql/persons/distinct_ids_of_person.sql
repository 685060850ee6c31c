-- The distinct ids of a person
--
-- Every distinct id that belongs to a person now: the ids whose latest row in
-- headwater.person_distinct_ids (highest version, argMax, never FINAL) points to the person and
-- is not deleted. A distinct id that a merge moved to another person still has its old row,
-- pointing here, until a background merge that may never come: a plain
-- `SELECT distinct_id FROM person_distinct_ids WHERE person_id = ...` would wrongly return it.
-- After a merge, the surviving person has the ids of both; the merged-away person has none.
-- The person's own row is not read: see person_by_distinct_id.sql for its properties.
--
-- Parameters:
--   {team_id:Int64}     the team (project)
--   {person_id:UUID}    the person's id, e.g. 5b0a2f0e-2a46-5d1b-8f0a-3c1e0c3b6f11
--
-- Returns one row per distinct id, in alphabetical order (no rows for an unknown person):
--   distinct_id String, version Int64 (the version of its latest row)
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_person_id=5b0a2f0e-2a46-5d1b-8f0a-3c1e0c3b6f11 \
--       --queries-file docs/sql/persons/distinct_ids_of_person.sql
SELECT
    distinct_id,
    latest.3 AS version
FROM
(
    SELECT
        distinct_id,
        -- one argMax over a tuple: every field from the same row; on a version tie, deleted wins
        argMax(tuple(person_id, is_deleted, version), tuple(version, is_deleted)) AS latest
    FROM headwater.person_distinct_ids
    WHERE team_id = {team_id:Int64}
        -- only ids that pointed here at some point can point here now (this narrows the scan;
        -- the argMax below still reads every row of each of these ids). GLOBAL: on a cluster
        -- (ADR 0008) the subquery runs once and its ids go to every shard; on one server it is IN.
        AND distinct_id GLOBAL IN (
            SELECT distinct_id
            FROM headwater.person_distinct_ids
            WHERE team_id = {team_id:Int64} AND person_id = {person_id:UUID}
        )
    GROUP BY distinct_id
)
WHERE latest.1 = {person_id:UUID} AND latest.2 = 0
ORDER BY distinct_id;
