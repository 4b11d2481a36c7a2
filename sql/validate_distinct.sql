-- The distinct values of one staged column ($column, a name) among rows without a structural rule: the
-- suite's per-value rules are checked on these instead of on every row. NULL is one of the values.
SELECT DISTINCT COLUMNS(lambda c: c = $column)
FROM read_parquet($staging)
WHERE rule IS NULL;
