-- The person behind a distinct id
--
-- Which person a distinct id belongs to now, with the person's current properties. A merge
-- ($identify, $create_alias, $merge_dangerously) re-points the merged person's distinct ids to
-- the other person by writing new rows in headwater.person_distinct_ids with a higher version;
-- the old rows stay visible until a background merge that may never come. So the current person
-- is the one of the distinct id's highest version, `argMax(..., version)` (never the first row
-- found, never FINAL), and the person's properties are those of its latest version, from the view
-- headwater.persons_latest. Follows chains of merges too: each merge re-points every distinct id
-- the merged person had, so the latest row of each already names the final person.
--
-- No row when the distinct id is unknown (never seen by the persons stage, e.g. only personless
-- events), when its latest row is deleted, or when its person is deleted.
--
-- Parameters:
--   {team_id:Int64}       the team (project)
--   {distinct_id:String}  the distinct id, e.g. 'user@example.com' or an anonymous device id
--
-- Returns at most one row:
--   distinct_id String, person_id UUID, properties String (JSON), is_identified UInt8,
--   created_at DateTime64(6, 'UTC'), person_version Int64, distinct_id_version Int64
--
-- Run:
--   clickhouse-client --param_team_id=1 --param_distinct_id=user-7 \
--       --queries-file docs/sql/persons/person_by_distinct_id.sql
SELECT
    d.distinct_id AS distinct_id,
    p.id AS person_id,
    p.properties AS properties,
    p.is_identified AS is_identified,
    p.created_at AS created_at,
    p.version AS person_version,
    d.mapping_version AS distinct_id_version
FROM
(
    SELECT
        distinct_id,
        -- one argMax over a tuple: person and flag from the same row; on a version tie, deleted wins
        argMax(tuple(person_id, is_deleted, version), tuple(version, is_deleted)) AS latest,
        latest.1 AS current_person_id,
        latest.3 AS mapping_version
    FROM headwater.person_distinct_ids
    WHERE team_id = {team_id:Int64} AND distinct_id = {distinct_id:String}
    GROUP BY distinct_id
    HAVING latest.2 = 0
) AS d
INNER JOIN
(
    SELECT id, properties, is_identified, created_at, version
    FROM headwater.persons_latest
    WHERE team_id = {team_id:Int64}
) AS p ON p.id = d.current_person_id;
