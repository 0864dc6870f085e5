-- When a PAUSED run times out, for the sweeper.
ALTER TABLE executions ADD COLUMN pause_deadline INTEGER;
ALTER TABLE task_runs ADD COLUMN pause_deadline INTEGER;
CREATE INDEX executions_by_pause_deadline ON executions (pause_deadline)
    WHERE pause_deadline IS NOT NULL;
CREATE INDEX task_runs_by_pause_deadline ON task_runs (pause_deadline)
    WHERE pause_deadline IS NOT NULL;

-- Completed results by cache key, per tenant.
CREATE TABLE cache_entries (
    tenant_id   TEXT NOT NULL,
    cache_key   TEXT NOT NULL,
    task_run_id TEXT NOT NULL,
    output      TEXT,
    expiration  INTEGER,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, cache_key)
) STRICT, WITHOUT ROWID;

-- Upstream lookups for templates: a task key's runs in an execution.
CREATE INDEX task_runs_by_execution_key ON task_runs (execution_id, task_key, created_at DESC);
