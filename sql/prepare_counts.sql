-- Events, users and items before the k-core filter: for summary.json and the error when nothing survives.
SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id) FROM core;
