-- The ledger on PostgreSQL: the same data as the SQLite schema in
-- migrations/*.sql, laid out so that several servers can share one
-- database and the tables can be split by tenant.
--
-- * Every primary key starts with tenant_id, and so does every index a
--   tenant's queries use.
-- * Ids are text (UUIDs for runs), as in SQLite, so rows convert alike.
-- * Documents (doc, output, result) are JSON text in TEXT columns, not
--   JSONB: JSONB refuses the "\u0000" escape clients may send in values,
--   and PostgreSQL's JSON functions fail on a document holding one, so no
--   query looks inside a document: what a query filters on is a column of
--   its own (metadata and labels as JSONB, whose keys and values the
--   ledger keeps free of NUL).
-- * Times are microseconds since the Unix epoch (BIGINT); state types are
--   their codes (SMALLINT).

-- Executions and task runs are stored as JSON documents with the columns
-- that queries filter and sort on beside them. last_seq is the tenant's
-- sequence of the run's latest event.
CREATE TABLE executions (
    tenant_id      TEXT NOT NULL,
    id             TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    task_id        TEXT,
    state_type     SMALLINT NOT NULL,
    request_id     TEXT,
    request_hash   TEXT,
    deleted_at     BIGINT,
    last_seq       BIGINT NOT NULL,
    -- When a PAUSED run times out, for the sweeper.
    pause_deadline BIGINT,
    -- The document's metadata, for lists filtered by metadata pairs.
    metadata       JSONB NOT NULL DEFAULT '{}',
    doc            TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

-- Lists, newest first.
CREATE INDEX executions_by_tenant_created
    ON executions (tenant_id, created_at DESC, id DESC);
-- Idempotent creation by request_id.
CREATE UNIQUE INDEX executions_by_request_id ON executions (tenant_id, request_id)
    WHERE request_id IS NOT NULL;
-- The sweeper looks across tenants for PAUSED runs whose time is up.
CREATE INDEX executions_by_pause_deadline ON executions (pause_deadline)
    WHERE pause_deadline IS NOT NULL;

CREATE TABLE task_runs (
    tenant_id      TEXT NOT NULL,
    id             TEXT NOT NULL,
    execution_id   TEXT NOT NULL,
    task_key       TEXT NOT NULL,
    dynamic_key    TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    state_type     SMALLINT NOT NULL,
    stale          BOOLEAN NOT NULL DEFAULT FALSE,
    deleted_at     BIGINT,
    last_seq       BIGINT NOT NULL,
    pause_deadline BIGINT,
    -- The document's labels, for lists filtered by label pairs.
    labels         JSONB NOT NULL DEFAULT '{}',
    doc            TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id),
    -- A task key's run for each dynamic key, found by key.
    CONSTRAINT task_runs_by_key UNIQUE (tenant_id, execution_id, task_key, dynamic_key),
    FOREIGN KEY (tenant_id, execution_id) REFERENCES executions (tenant_id, id)
);

CREATE INDEX task_runs_by_tenant_created
    ON task_runs (tenant_id, created_at DESC, id DESC);
CREATE INDEX task_runs_by_execution_created
    ON task_runs (tenant_id, execution_id, created_at DESC, id DESC);
CREATE INDEX task_runs_by_pause_deadline ON task_runs (pause_deadline)
    WHERE pause_deadline IS NOT NULL;
-- Templates read the latest COMPLETED run of a task key, and whether any
-- of the key's runs has not ended, from the index alone.
CREATE INDEX task_runs_by_key_state
    ON task_runs (tenant_id, execution_id, task_key, state_type, created_at DESC, id DESC);
-- A stream's snapshot reads an execution's task runs in the order of their
-- latest events, up to the log position the stream follows from.
CREATE INDEX task_runs_by_execution_seq ON task_runs (tenant_id, execution_id, last_seq);

-- Every state a run has been in, oldest first by pos. pos follows commit
-- order within a run because a tenant's writes are serialized: the
-- transaction that appends a run's states holds its tenant's row of
-- tenant_heads until it commits.
CREATE TABLE states (
    tenant_id TEXT NOT NULL,
    run_id    TEXT NOT NULL,
    pos       BIGINT GENERATED ALWAYS AS IDENTITY,
    id        TEXT NOT NULL,
    doc       TEXT NOT NULL,
    PRIMARY KEY (tenant_id, run_id, pos)
);

-- The first result of each transition_id, so a repeat returns it.
CREATE TABLE transitions (
    tenant_id     TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    transition_id TEXT NOT NULL,
    result        TEXT NOT NULL,
    PRIMARY KEY (tenant_id, run_id, transition_id)
);

-- Each tenant's append-only event log, numbered densely from 1 by
-- tenant_heads. format says how payload is encoded: 1, an encoded
-- runledger.v1.StatusEvent (logs written before event records); 2, the
-- ledger's event record, versioned JSON (EventRecord).
CREATE TABLE events (
    tenant_id    TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    execution_id TEXT NOT NULL,
    task_run_id  TEXT,
    task_id      TEXT,
    occurred_at  BIGINT NOT NULL,
    format       SMALLINT NOT NULL,
    payload      BYTEA NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);

-- The primary key reads a tenant's events in order (and finds retention's
-- cutoff: sequence order is time order); these read one run's.
CREATE INDEX events_by_execution ON events (tenant_id, execution_id, seq);
CREATE INDEX events_by_task_run ON events (tenant_id, task_run_id, seq)
    WHERE task_run_id IS NOT NULL;

-- Per tenant: head is the last sequence given out, raised in the same
-- transaction as the events it numbers (the row lock orders a tenant's
-- writers, so sequences are dense and commit in order, and the commit
-- notifies channel runledger_events with "<tenant>:<head>"); compacted is
-- the highest sequence retention has removed from the log.
CREATE TABLE tenant_heads (
    tenant_id TEXT PRIMARY KEY,
    head      BIGINT NOT NULL DEFAULT 0,
    compacted BIGINT NOT NULL DEFAULT 0,
    CHECK (compacted <= head)
);

-- Completed results by cache key, per tenant.
CREATE TABLE cache_entries (
    tenant_id   TEXT NOT NULL,
    cache_key   TEXT NOT NULL,
    task_run_id TEXT NOT NULL,
    output      TEXT,
    expiration  BIGINT,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, cache_key)
);

-- Retention removes cache entries once they expire.
CREATE INDEX cache_entries_by_expiration ON cache_entries (expiration)
    WHERE expiration IS NOT NULL;

-- API keys: only a SHA-256 of each secret is kept.
CREATE TABLE api_keys (
    tenant_id    TEXT NOT NULL,
    id           TEXT NOT NULL,
    name         TEXT NOT NULL,
    secret_hash  TEXT NOT NULL UNIQUE,
    rate         DOUBLE PRECISION,
    daily_quota  BIGINT,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);

-- Request counts and revocations name a key by its id alone.
CREATE UNIQUE INDEX api_keys_by_id ON api_keys (id);

-- Requests per API key per UTC day (days since the epoch), for daily
-- quotas that survive restarts.
CREATE TABLE key_usage (
    tenant_id TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    day       BIGINT NOT NULL,
    requests  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, key_id, day)
);

-- A server starting reads today's counts of every key.
CREATE INDEX key_usage_by_day ON key_usage (day);
