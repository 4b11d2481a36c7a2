-- One row per user: the chronological item sequence (ties in timestamp broken by source row) split
-- leave-one-out: the last item is the test target, the second-last the validation target, the rest history.
COPY (
    WITH seq AS (
        SELECT u.user_idx, list(i.item_idx ORDER BY c."timestamp", c."row") AS items
        FROM core AS c
        JOIN users AS u USING (user_id)
        JOIN items AS i USING (item_id)
        GROUP BY u.user_idx
    )
    SELECT user_idx,
           list_slice(items, 1, len(items) - 2) AS history,
           items[len(items) - 1] AS valid_item,
           items[len(items)] AS test_item
    FROM seq
    ORDER BY user_idx
) TO $path (FORMAT parquet);
