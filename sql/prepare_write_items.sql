COPY (SELECT item_idx, item_id, "count" FROM items ORDER BY item_idx) TO $path (FORMAT parquet);
