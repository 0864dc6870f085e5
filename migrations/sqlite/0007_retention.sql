-- Retention removes cache entries once they expire.
CREATE INDEX cache_entries_by_expiration ON cache_entries (expiration)
    WHERE expiration IS NOT NULL;

-- Retention keeps only the current state of a finished run (COMPLETED,
-- CANCELLED or deleted: a FAILED or CRASHED run may yet be retried, and
-- keeps its transition results) whose events it has removed. Runs it
-- passed before this rule existed get the same treatment once, here.
DELETE FROM transitions WHERE run_id IN (
    SELECT id FROM executions
    WHERE last_seq <= (SELECT value FROM counters WHERE name = 'compacted_seq')
      AND (state_type IN (4, 6) OR deleted_at IS NOT NULL)
    UNION ALL
    SELECT id FROM task_runs
    WHERE last_seq <= (SELECT value FROM counters WHERE name = 'compacted_seq')
      AND (state_type IN (4, 6) OR deleted_at IS NOT NULL)
);
DELETE FROM states WHERE run_id IN (
    SELECT id FROM executions
    WHERE last_seq <= (SELECT value FROM counters WHERE name = 'compacted_seq')
      AND (state_type IN (4, 6) OR deleted_at IS NOT NULL)
    UNION ALL
    SELECT id FROM task_runs
    WHERE last_seq <= (SELECT value FROM counters WHERE name = 'compacted_seq')
      AND (state_type IN (4, 6) OR deleted_at IS NOT NULL)
)
AND rowid < (SELECT MAX(kept.rowid) FROM states AS kept WHERE kept.run_id = states.run_id);

-- Templates read the latest COMPLETED run of a task key, and whether any
-- of the key's runs has not ended, from the index alone.
CREATE INDEX task_runs_by_key_state
    ON task_runs (execution_id, task_key, state_type, created_at DESC, id DESC);
