-- Staging positions of the quarantined rows, so the events copy can skip them in one streaming pass.
SELECT ord FROM quarantined ORDER BY ord
