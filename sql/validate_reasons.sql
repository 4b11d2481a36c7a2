-- Quarantined rows per rule, for the ingest summary.
SELECT rule, count(*) FROM quarantined GROUP BY rule ORDER BY rule
