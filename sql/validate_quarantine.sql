-- Every staged row that does not become an event, with the rule it broke: rules set at ingest (column_count,
-- utf8_text, unbalanced_quote; timestamp_in_range for a number no int64 holds or a datetime before 1677 or after
-- 2262), the GX suite's per-row failures (registered as `failures`: ord, rule, detail), then duplicate_event, the
-- one rule that needs the whole table: among rows that passed everything else, the first occurrence (lowest
-- source row) of an exact event stays and later copies are quarantined (the events of one `sequences` line share a
-- row but differ in timestamp, so two copies never share a row).
-- `ord` is the 0-based position in the staging file. `raw` is what ingest staged (a Parquet row's values), else
-- the row's values as text; for a text source ingest then replaces it with the row's line, read from the file.
CREATE OR REPLACE TEMP TABLE quarantined AS
WITH staged AS NOT MATERIALIZED (
    SELECT file_row_number AS ord, * EXCLUDE (file_row_number)
    FROM read_parquet($staging, file_row_number = true)
), clean AS NOT MATERIALIZED (
    SELECT ord, "row", user_id, item_id, "timestamp", rating, behavior
    FROM staged
    WHERE rule IS NULL AND ord NOT IN (SELECT ord FROM failures)
), repeated_hashes AS (
    -- grouping 10M rows by one hash is cheaper than by five columns; the exact grouping below then runs
    -- only on rows whose hash repeats (the duplicates, and the rare collision)
    SELECT hash(user_id, item_id, "timestamp", rating, behavior) AS h FROM clean GROUP BY h HAVING count(*) > 1
), repeated AS (
    SELECT user_id, item_id, "timestamp", rating, behavior, min("row") AS first_row
    FROM clean
    WHERE hash(user_id, item_id, "timestamp", rating, behavior) IN (SELECT h FROM repeated_hashes)
    GROUP BY ALL
    HAVING count(*) > 1
)
SELECT ord, "row", raw, rule, detail FROM staged WHERE rule IS NOT NULL
UNION ALL
SELECT s.ord, s."row", coalesce(s.raw, concat_ws(',', s.user_id, s.item_id, s."timestamp", s.rating, s.behavior)),
       f.rule, f.detail
FROM staged s JOIN failures f ON s.ord = f.ord
WHERE s.rule IS NULL
UNION ALL
SELECT c.ord, c."row", concat_ws(',', c.user_id, c.item_id, c."timestamp", c.rating, c.behavior), 'duplicate_event',
       printf('same user, item, timestamp, rating and behavior as row %d, which is kept', r.first_row)
FROM clean c JOIN repeated r
  ON c.user_id = r.user_id AND c.item_id = r.item_id AND c."timestamp" = r."timestamp"
 AND c.rating IS NOT DISTINCT FROM r.rating AND c.behavior IS NOT DISTINCT FROM r.behavior
 AND c."row" > r.first_row;
