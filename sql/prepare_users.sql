-- Dense user ids 0..U-1 in order of each user's first event (earliest timestamp, then smallest source
-- row, then raw id): deterministic, and for a file with one line per user it is the line order.
CREATE OR REPLACE TEMP TABLE users AS
SELECT CAST(row_number() OVER (ORDER BY min("timestamp"), min("row"), user_id) - 1 AS INTEGER) AS user_idx,
       user_id
FROM core
GROUP BY user_id;
