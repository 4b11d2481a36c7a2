-- The quarantine file: one row per rejected input row, in source order, naming the source file.
COPY (
    SELECT $source AS source, "row", raw, rule, detail FROM quarantined ORDER BY "row", ord
) TO $output (FORMAT parquet);
