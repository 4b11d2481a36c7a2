COPY (SELECT user_idx, user_id FROM users ORDER BY user_idx) TO $path (FORMAT parquet);
