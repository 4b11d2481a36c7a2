-- One round of the k-core filter: delete the events of every user and every item that has fewer than $k
-- events in the current table (both counted before the round deletes anything). prepare.py repeats it
-- until a round deletes nothing: a fixed point where every user and item left has >= $k events.
-- DELETE in rounds costs a third of the CPU of rebuilding the table each round (CREATE OR REPLACE ...
-- WHERE ... IN), which is itself several times faster than one WITH RECURSIVE.
DELETE FROM core
WHERE user_id IN (SELECT user_id FROM core GROUP BY user_id HAVING count(*) < $k)
   OR item_id IN (SELECT item_id FROM core GROUP BY item_id HAVING count(*) < $k);
