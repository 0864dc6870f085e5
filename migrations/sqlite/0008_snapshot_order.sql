-- A stream's snapshot reads an execution's task runs in the order of their
-- latest events, up to the log position the stream follows from.
CREATE INDEX task_runs_by_execution_seq ON task_runs (execution_id, last_seq);
