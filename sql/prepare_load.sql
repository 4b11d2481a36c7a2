-- The validated events prepare needs; rating and behavior stay behind in events.parquet.
CREATE OR REPLACE TEMP TABLE core AS
SELECT "row", user_id, item_id, "timestamp"
FROM read_parquet($events);
