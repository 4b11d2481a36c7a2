-- Dense item ids 1..N (0 is padding), most frequent item first, ties by raw id: deterministic, and the
-- popularity baseline is simply the smallest ids.
CREATE OR REPLACE TEMP TABLE items AS
SELECT CAST(row_number() OVER (ORDER BY count(*) DESC, item_id) AS INTEGER) AS item_idx,
       item_id,
       count(*) AS "count"
FROM core
GROUP BY item_id;
