-- Every index is written on every insert. Keep only those a query uses.

-- Upstream lookups use task_runs_by_key's (execution_id, task_key) prefix.
DROP INDEX task_runs_by_execution_key;

-- Retention finds its cutoff by walking the log in sequence order, which
-- is also time order.
DROP INDEX events_by_time;

-- State ids are generated unique; nothing looks a state up by id.
CREATE TABLE states_new (
    id        TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    run_id    TEXT NOT NULL,
    doc       TEXT NOT NULL
) STRICT;
INSERT INTO states_new (rowid, id, tenant_id, run_id, doc)
    SELECT rowid, id, tenant_id, run_id, doc FROM states;
DROP TABLE states;
ALTER TABLE states_new RENAME TO states;
CREATE INDEX states_by_run ON states (run_id);
