-- Executions and task runs are stored as JSON documents with the columns
-- that queries filter and sort on beside them.
CREATE TABLE executions (
    id           TEXT PRIMARY KEY NOT NULL,
    tenant_id    TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    task_id      TEXT,
    state_type   INTEGER NOT NULL,
    request_id   TEXT,
    request_hash TEXT,
    deleted_at   INTEGER,
    last_seq     INTEGER NOT NULL,
    doc          TEXT NOT NULL
) STRICT;

CREATE INDEX executions_by_tenant_created ON executions (tenant_id, created_at DESC, id DESC);
CREATE UNIQUE INDEX executions_by_request_id ON executions (tenant_id, request_id)
    WHERE request_id IS NOT NULL;

CREATE TABLE task_runs (
    id           TEXT PRIMARY KEY NOT NULL,
    tenant_id    TEXT NOT NULL,
    execution_id TEXT NOT NULL REFERENCES executions (id),
    task_key     TEXT NOT NULL,
    dynamic_key  TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    state_type   INTEGER NOT NULL,
    stale        INTEGER NOT NULL DEFAULT 0,
    deleted_at   INTEGER,
    last_seq     INTEGER NOT NULL,
    doc          TEXT NOT NULL
) STRICT;

CREATE UNIQUE INDEX task_runs_by_key ON task_runs (execution_id, task_key, dynamic_key);
CREATE INDEX task_runs_by_tenant_created ON task_runs (tenant_id, created_at DESC, id DESC);
CREATE INDEX task_runs_by_execution_created ON task_runs (execution_id, created_at DESC, id DESC);

-- Every state a run has been in, oldest first by rowid.
CREATE TABLE states (
    id        TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL,
    run_id    TEXT NOT NULL,
    doc       TEXT NOT NULL
) STRICT;

CREATE INDEX states_by_run ON states (run_id);

-- The first result of each transition_id, so a repeat returns it.
CREATE TABLE transitions (
    run_id        TEXT NOT NULL,
    transition_id TEXT NOT NULL,
    result        TEXT NOT NULL,
    PRIMARY KEY (run_id, transition_id)
) STRICT, WITHOUT ROWID;

-- The append-only event log. payload is the encoded runledger.v1.StatusEvent.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY NOT NULL,
    tenant_id    TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    task_run_id  TEXT,
    task_id      TEXT,
    occurred_at  INTEGER NOT NULL,
    payload      BLOB NOT NULL
) STRICT;

CREATE INDEX events_by_tenant ON events (tenant_id, seq);
CREATE INDEX events_by_execution ON events (execution_id, seq);
CREATE INDEX events_by_task_run ON events (task_run_id, seq) WHERE task_run_id IS NOT NULL;
CREATE INDEX events_by_time ON events (occurred_at);

-- Small named counters: compacted_seq is the highest sequence removed from
-- the log by retention.
CREATE TABLE counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO counters (name, value) VALUES ('compacted_seq', 0);
