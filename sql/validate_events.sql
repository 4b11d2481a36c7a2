-- The validated events: every staged row not in `quarantined`, in source order (row, then position).
COPY (
    SELECT "row", user_id, item_id, "timestamp", rating, behavior
    FROM read_parquet($staging, file_row_number = true)
    WHERE file_row_number NOT IN (SELECT ord FROM quarantined)
    ORDER BY "row", "timestamp"
) TO $output (FORMAT parquet);
