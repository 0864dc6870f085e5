-- Sequences are dense per tenant: each tenant's events are numbered 1..N
-- by its own counter row, updated in the transaction that writes them.
-- The log keeps the ledger's own event records; rows written before this
-- migration keep their earlier encoding (format 1) and their numbers, so
-- that cursors clients hold stay valid.

CREATE TABLE tenant_heads (
    tenant_id TEXT PRIMARY KEY NOT NULL,
    -- The latest sequence given out.
    head      INTEGER NOT NULL DEFAULT 0,
    -- The highest sequence retention has removed.
    compacted INTEGER NOT NULL DEFAULT 0
) STRICT, WITHOUT ROWID;

INSERT INTO tenant_heads (tenant_id, head, compacted)
SELECT tenant_id, MAX(head),
       MIN(MAX(head), (SELECT value FROM counters WHERE name = 'compacted_seq'))
FROM (
    SELECT tenant_id, MAX(seq) AS head FROM events GROUP BY tenant_id
    UNION ALL
    SELECT tenant_id, MAX(last_seq) FROM executions GROUP BY tenant_id
    UNION ALL
    SELECT tenant_id, MAX(last_seq) FROM task_runs GROUP BY tenant_id
)
GROUP BY tenant_id;

CREATE TABLE events_new (
    tenant_id    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    execution_id TEXT NOT NULL,
    task_run_id  TEXT,
    task_id      TEXT,
    occurred_at  INTEGER NOT NULL,
    -- 1: an encoded StatusEvent (written before this migration);
    -- 2: the ledger's event record, versioned JSON.
    format       INTEGER NOT NULL,
    payload      BLOB NOT NULL,
    PRIMARY KEY (tenant_id, seq)
) STRICT;

INSERT INTO events_new (tenant_id, seq, execution_id, task_run_id, task_id, occurred_at, format, payload)
SELECT tenant_id, seq, execution_id, task_run_id, task_id, occurred_at, 1, payload
FROM events ORDER BY seq;

DROP TABLE events;
ALTER TABLE events_new RENAME TO events;

CREATE INDEX events_by_execution ON events (execution_id, seq);
CREATE INDEX events_by_task_run ON events (task_run_id, seq) WHERE task_run_id IS NOT NULL;

DELETE FROM counters WHERE name = 'compacted_seq';
