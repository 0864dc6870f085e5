//! The PostgreSQL backend's queries, named. Every query of a tenant's
//! rows names the tenant first, as every key and index starts with it.

pub(crate) const EXECUTION_BY_ID: &str =
    "SELECT doc, last_seq FROM executions WHERE tenant_id = $1 AND id = $2";
pub(crate) const TASK_RUN_BY_ID: &str =
    "SELECT doc, last_seq FROM task_runs WHERE tenant_id = $1 AND id = $2";
pub(crate) const STATES_OF_RUN: &str = "SELECT pos, doc FROM states \
     WHERE tenant_id = $1 AND run_id = $2 AND pos > $3 ORDER BY pos LIMIT $4";
pub(crate) const TASK_RUNS_OF_EXECUTION: &str = "SELECT doc, last_seq FROM task_runs \
     WHERE tenant_id = $1 AND execution_id = $2 AND last_seq > $3 AND last_seq <= $4 \
     ORDER BY last_seq LIMIT $5";
pub(crate) const EVENTS_OF_TENANT: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
pub(crate) const EVENTS_OF_EXECUTION: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = $1 AND execution_id = $2 AND seq > $3 ORDER BY seq LIMIT $4";
pub(crate) const EVENTS_OF_EXECUTION_ONLY: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = $1 AND execution_id = $2 AND task_run_id IS NULL AND seq > $3 \
     ORDER BY seq LIMIT $4";
pub(crate) const EVENTS_OF_TASK_RUN: &str = "SELECT seq, tenant_id, execution_id, task_run_id, task_id, format, payload \
     FROM events WHERE tenant_id = $1 AND task_run_id = $2 AND seq > $3 ORDER BY seq LIMIT $4";
/// The latest sequence given out to a tenant.
pub(crate) const HEAD_OF_TENANT: &str =
    "SELECT COALESCE((SELECT head FROM tenant_heads WHERE tenant_id = $1), 0)";
pub(crate) const COMPACTED_OF_TENANT: &str =
    "SELECT COALESCE((SELECT compacted FROM tenant_heads WHERE tenant_id = $1), 0)";

pub(crate) const EXECUTION_DOC: &str =
    "SELECT doc FROM executions WHERE tenant_id = $1 AND id = $2";
pub(crate) const TASK_RUN_DOC: &str = "SELECT doc FROM task_runs WHERE tenant_id = $1 AND id = $2";
pub(crate) const EXECUTION_BY_REQUEST_ID: &str =
    "SELECT doc, request_hash FROM executions WHERE tenant_id = $1 AND request_id = $2";
pub(crate) const REQUEST_HASH: &str =
    "SELECT request_hash FROM executions WHERE tenant_id = $1 AND id = $2";
pub(crate) const TASK_RUN_BY_KEY: &str = "SELECT doc FROM task_runs \
     WHERE tenant_id = $1 AND execution_id = $2 AND task_key = $3 AND dynamic_key = $4";
pub(crate) const COUNT_TASK_RUNS_FOR_KEY: &str = "SELECT COUNT(*) FROM task_runs \
     WHERE tenant_id = $1 AND execution_id = $2 AND task_key = $3";
pub(crate) const TASK_RUNS_OF: &str = "SELECT doc FROM task_runs \
     WHERE tenant_id = $1 AND execution_id = $2 ORDER BY created_at, id";
/// The latest COMPLETED run of a task key but one ($4), with its
/// document: its output is taken out of it by the server, as PostgreSQL's
/// JSON functions fail on a document holding a "\u0000" escape.
pub(crate) const LATEST_COMPLETED_OF_KEY: &str = "SELECT id, doc FROM task_runs \
     WHERE tenant_id = $1 AND execution_id = $2 AND task_key = $3 AND state_type = 4 AND id <> $4 \
     ORDER BY created_at DESC, id DESC LIMIT 1";
/// Whether a task key has runs but one ($4), and whether one of them has
/// not ended (SCHEDULED, PENDING, RUNNING, PAUSED, CANCELLING).
pub(crate) const RUNS_OF_KEY_EXIST: &str = "SELECT \
     EXISTS (SELECT 1 FROM task_runs WHERE tenant_id = $1 AND execution_id = $2 AND task_key = $3 \
         AND id <> $4), \
     EXISTS (SELECT 1 FROM task_runs WHERE tenant_id = $1 AND execution_id = $2 AND task_key = $3 \
         AND id <> $4 AND state_type IN (1, 2, 3, 8, 9))";
pub(crate) const EXPIRED_PAUSED_EXECUTIONS: &str =
    "SELECT tenant_id, id FROM executions WHERE pause_deadline <= $1 LIMIT $2";
pub(crate) const EXPIRED_PAUSED_TASK_RUNS: &str =
    "SELECT tenant_id, id FROM task_runs WHERE pause_deadline <= $1 LIMIT $2";
pub(crate) const CACHE_ENTRY: &str =
    "SELECT output, expiration FROM cache_entries WHERE tenant_id = $1 AND cache_key = $2";
pub(crate) const PUT_CACHE_ENTRY: &str = "INSERT INTO cache_entries \
     (tenant_id, cache_key, task_run_id, output, expiration, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, cache_key) DO UPDATE SET \
     task_run_id = excluded.task_run_id, output = excluded.output, \
     expiration = excluded.expiration, created_at = excluded.created_at";
pub(crate) const EXPIRED_CACHE_ENTRIES: &str = "DELETE FROM cache_entries WHERE expiration <= $1";
pub(crate) const TRANSITION: &str = "SELECT result FROM transitions \
     WHERE tenant_id = $1 AND run_id = $2 AND transition_id = $3";
pub(crate) const RECORD_TRANSITION: &str =
    "INSERT INTO transitions (tenant_id, run_id, transition_id, result) VALUES ($1, $2, $3, $4)";
/// Request counts to add, by tenant, key id and day.
pub(crate) const RECORD_KEY_USAGE: &str = "INSERT INTO key_usage (tenant_id, key_id, day, requests) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
     ON CONFLICT (tenant_id, key_id, day) DO UPDATE \
     SET requests = key_usage.requests + excluded.requests";
/// One request from a key's daily quota ($4), if any is left: the new
/// count, or no row.
pub(crate) const TAKE_QUOTA: &str = "INSERT INTO key_usage AS u (tenant_id, key_id, day, requests) \
     SELECT $1, $2, $3, 1 WHERE $4 > 0 \
     ON CONFLICT (tenant_id, key_id, day) DO UPDATE SET requests = u.requests + 1 \
     WHERE u.requests < $4 \
     RETURNING requests";
/// One token from a key's bucket: $3 tokens a second, as many held at
/// most, refilled by the database's clock; the tokens left, or no row when
/// none was.
pub(crate) const TAKE_TOKEN: &str = "WITH now AS (SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint AS at) \
     INSERT INTO key_buckets AS b (tenant_id, key_id, tokens, at) \
     SELECT $1, $2, GREATEST($3, 1.0) - 1, now.at FROM now \
     ON CONFLICT (tenant_id, key_id) DO UPDATE \
     SET tokens = LEAST(GREATEST($3, 1.0), b.tokens + (excluded.at - b.at) / 1e6 * $3) - 1, \
         at = excluded.at \
     WHERE LEAST(GREATEST($3, 1.0), b.tokens + (excluded.at - b.at) / 1e6 * $3) >= 1 \
     RETURNING tokens";
pub(crate) const TOUCH_KEYS: &str =
    "UPDATE api_keys SET last_used_at = $1 WHERE secret_hash = ANY($2)";

/// New executions; those meeting a stored one (same id, or same
/// request_id) are left out, and the ids written are returned.
pub(crate) const INSERT_EXECUTIONS: &str = "INSERT INTO executions \
     (tenant_id, id, created_at, task_id, state_type, request_id, request_hash, deleted_at, \
      last_seq, pause_deadline, metadata, doc) \
     SELECT tenant_id, id, created_at, task_id, state_type, request_id, request_hash, deleted_at, \
      last_seq, pause_deadline, metadata::jsonb, doc \
     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::smallint[], $6::text[], \
      $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[], $12::text[]) \
     AS x (tenant_id, id, created_at, task_id, state_type, request_id, request_hash, deleted_at, \
      last_seq, pause_deadline, metadata, doc) \
     ON CONFLICT DO NOTHING RETURNING id";
pub(crate) const UPDATE_EXECUTIONS: &str = "UPDATE executions AS e SET \
     state_type = x.state_type, deleted_at = x.deleted_at, last_seq = x.last_seq, \
     pause_deadline = x.pause_deadline, metadata = x.metadata::jsonb, doc = x.doc \
     FROM UNNEST($1::text[], $2::text[], $3::smallint[], $4::bigint[], $5::bigint[], \
      $6::bigint[], $7::text[], $8::text[]) \
     AS x (tenant_id, id, state_type, deleted_at, last_seq, pause_deadline, metadata, doc) \
     WHERE e.tenant_id = x.tenant_id AND e.id = x.id";
/// New task runs; those meeting a stored one (same id, or same task key
/// and dynamic key) are left out, and the ids written are returned.
pub(crate) const INSERT_TASK_RUNS: &str = "INSERT INTO task_runs \
     (tenant_id, id, execution_id, task_key, dynamic_key, created_at, state_type, stale, \
      deleted_at, last_seq, pause_deadline, labels, doc) \
     SELECT tenant_id, id, execution_id, task_key, dynamic_key, created_at, state_type, stale, \
      deleted_at, last_seq, pause_deadline, labels::jsonb, doc \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
      $7::smallint[], $8::boolean[], $9::bigint[], $10::bigint[], $11::bigint[], $12::text[], \
      $13::text[]) \
     AS x (tenant_id, id, execution_id, task_key, dynamic_key, created_at, state_type, stale, \
      deleted_at, last_seq, pause_deadline, labels, doc) \
     ON CONFLICT DO NOTHING RETURNING id";
pub(crate) const UPDATE_TASK_RUNS: &str = "UPDATE task_runs AS t SET \
     state_type = x.state_type, stale = x.stale, deleted_at = x.deleted_at, \
     last_seq = x.last_seq, pause_deadline = x.pause_deadline, labels = x.labels::jsonb, \
     doc = x.doc \
     FROM UNNEST($1::text[], $2::text[], $3::smallint[], $4::boolean[], $5::bigint[], \
      $6::bigint[], $7::bigint[], $8::text[], $9::text[]) \
     AS x (tenant_id, id, state_type, stale, deleted_at, last_seq, pause_deadline, labels, doc) \
     WHERE t.tenant_id = x.tenant_id AND t.id = x.id";
/// History rows, numbered (pos) in the order given.
pub(crate) const INSERT_STATES: &str = "INSERT INTO states (tenant_id, run_id, id, doc) \
     SELECT tenant_id, run_id, id, doc \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY \
     AS x (tenant_id, run_id, id, doc, n) ORDER BY n";
pub(crate) const INSERT_EVENTS: &str = "INSERT INTO events \
     (tenant_id, seq, execution_id, task_run_id, task_id, occurred_at, format, payload) \
     SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], \
      $6::bigint[], $7::smallint[], $8::bytea[])";
/// Gives each tenant a counter row if it has none yet.
pub(crate) const ADD_HEADS: &str = "INSERT INTO tenant_heads (tenant_id) \
     SELECT t FROM UNNEST($1::text[]) AS t ORDER BY t ON CONFLICT DO NOTHING";
/// Locks the tenants' counter rows, always in the same order.
pub(crate) const LOCK_HEADS: &str = "SELECT tenant_id, head FROM tenant_heads \
     WHERE tenant_id = ANY($1) ORDER BY tenant_id FOR UPDATE";
/// Sets the tenants' heads and tells listeners of channel
/// runledger_events, "<tenant>:<head>", once the transaction commits.
pub(crate) const SET_HEADS: &str = "WITH raised AS (UPDATE tenant_heads AS h SET head = x.head \
     FROM UNNEST($1::text[], $2::bigint[]) AS x (tenant_id, head) \
     WHERE h.tenant_id = x.tenant_id RETURNING h.tenant_id, h.head) \
     SELECT COUNT(pg_notify('runledger_events', tenant_id || ':' || head)) FROM raised";

/// Of the new runs a transaction is about to add (executions: $1
/// tenant, $2 id, $3 request_id; task runs: $4 tenant, $5 id, $6
/// execution, $7 task key, $8 dynamic key), those stored already under
/// the same id or idempotency key: their ids.
pub(crate) const STORED_CONFLICTS: &str = "SELECT x.id \
     FROM UNNEST($1::text[], $2::text[], $3::text[]) AS x (tenant_id, id, request_id) \
     WHERE EXISTS (SELECT 1 FROM executions AS e \
       WHERE e.tenant_id = x.tenant_id AND e.id = x.id) \
      OR (x.request_id IS NOT NULL AND EXISTS (SELECT 1 FROM executions AS e \
       WHERE e.tenant_id = x.tenant_id AND e.request_id = x.request_id)) \
     UNION ALL \
     SELECT y.id \
     FROM UNNEST($4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) \
      AS y (tenant_id, id, execution_id, task_key, dynamic_key) \
     WHERE EXISTS (SELECT 1 FROM task_runs AS t \
       WHERE t.tenant_id = y.tenant_id AND t.id = y.id) \
      OR EXISTS (SELECT 1 FROM task_runs AS t \
       WHERE t.tenant_id = y.tenant_id AND t.execution_id = y.execution_id \
        AND t.task_key = y.task_key AND t.dynamic_key = y.dynamic_key)";

/// Ends a transaction's writes in one statement that holds the tenants'
/// counter rows only from here to the commit: raises each tenant's head
/// ($1 tenants, $2 how many events) and locks it; writes the events
/// ($3..$10, each numbered from 1 in the transaction) and the new runs
/// not written yet ($11..$22 executions, $23..$35 task runs, their latest
/// events numbered the same way) after the head they found, and the
/// history rows not written yet ($36..$39); tells
/// listeners of channel runledger_events, "<tenant>:<head>", once the
/// transaction commits. Returns each tenant's head before the transaction
/// and how many of the new runs were written; fails as a serialization
/// failure, writing nothing, unless that is all of them ($40): one may
/// meet a run another writer stored meanwhile under the same idempotency
/// key.
pub(crate) const SEAL: &str = "WITH counts AS (\
       SELECT * FROM UNNEST($1::text[], $2::bigint[]) AS c (tenant_id, n)), \
     raised AS (\
       INSERT INTO tenant_heads AS h (tenant_id, head) \
       SELECT tenant_id, n FROM counts ORDER BY tenant_id \
       ON CONFLICT (tenant_id) DO UPDATE SET head = h.head + EXCLUDED.head \
       RETURNING h.tenant_id, h.head), \
     bases AS (\
       SELECT r.tenant_id, r.head, r.head - c.n AS base \
       FROM raised AS r JOIN counts AS c USING (tenant_id)), \
     logged AS (\
       INSERT INTO events \
       (tenant_id, seq, execution_id, task_run_id, task_id, occurred_at, format, payload) \
       SELECT e.tenant_id, b.base + e.n, e.execution_id, e.task_run_id, e.task_id, \
        e.occurred_at, e.format, e.payload \
       FROM UNNEST($3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[], \
        $8::bigint[], $9::smallint[], $10::bytea[]) \
        AS e (tenant_id, n, execution_id, task_run_id, task_id, occurred_at, format, payload) \
       JOIN bases AS b USING (tenant_id)), \
     new_executions AS (\
       INSERT INTO executions \
       (tenant_id, id, created_at, task_id, state_type, request_id, request_hash, deleted_at, \
        last_seq, pause_deadline, metadata, doc) \
       SELECT x.tenant_id, x.id, x.created_at, x.task_id, x.state_type, x.request_id, \
        x.request_hash, x.deleted_at, b.base + x.n, x.pause_deadline, x.metadata::jsonb, x.doc \
       FROM UNNEST($11::text[], $12::text[], $13::bigint[], $14::text[], $15::smallint[], \
        $16::text[], $17::text[], $18::bigint[], $19::bigint[], $20::bigint[], $21::text[], \
        $22::text[]) \
        AS x (tenant_id, id, created_at, task_id, state_type, request_id, request_hash, \
         deleted_at, n, pause_deadline, metadata, doc) \
       JOIN bases AS b USING (tenant_id) \
       ON CONFLICT DO NOTHING RETURNING 1), \
     new_task_runs AS (\
       INSERT INTO task_runs \
       (tenant_id, id, execution_id, task_key, dynamic_key, created_at, state_type, stale, \
        deleted_at, last_seq, pause_deadline, labels, doc) \
       SELECT x.tenant_id, x.id, x.execution_id, x.task_key, x.dynamic_key, x.created_at, \
        x.state_type, x.stale, x.deleted_at, b.base + x.n, x.pause_deadline, x.labels::jsonb, \
        x.doc \
       FROM UNNEST($23::text[], $24::text[], $25::text[], $26::text[], $27::text[], \
        $28::bigint[], $29::smallint[], $30::boolean[], $31::bigint[], $32::bigint[], \
        $33::bigint[], $34::text[], $35::text[]) \
        AS x (tenant_id, id, execution_id, task_key, dynamic_key, created_at, state_type, \
         stale, deleted_at, n, pause_deadline, labels, doc) \
       JOIN bases AS b USING (tenant_id) \
       ON CONFLICT DO NOTHING RETURNING 1), \
     history AS (\
       INSERT INTO states (tenant_id, run_id, id, doc) \
       SELECT tenant_id, run_id, id, doc \
       FROM UNNEST($36::text[], $37::text[], $38::text[], $39::text[]) WITH ORDINALITY \
        AS s (tenant_id, run_id, id, doc, n) ORDER BY n), \
     told AS (\
       SELECT COUNT(pg_notify('runledger_events', tenant_id || ':' || head)) AS n FROM bases), \
     written AS (\
       SELECT (SELECT COUNT(*) FROM new_executions) + (SELECT COUNT(*) FROM new_task_runs) AS n) \
     SELECT b.tenant_id, b.base, \
      CASE WHEN w.n = $40 THEN w.n ELSE runledger_new_run_raced() END \
     FROM bases AS b, told, written AS w";

/// Where retention stops in a tenant's log: the last event before the
/// first that occurred at or after the cutoff ($2), or the log's last
/// event; and the tenant's compaction mark.
pub(crate) const PRUNE_BOUNDS: &str = "SELECT \
     COALESCE( \
         (SELECT seq - 1 FROM events WHERE tenant_id = $1 AND occurred_at >= $2 ORDER BY seq LIMIT 1), \
         (SELECT MAX(seq) FROM events WHERE tenant_id = $1)), \
     COALESCE((SELECT compacted FROM tenant_heads WHERE tenant_id = $1), 0)";
/// Removes a tenant's events $2 < seq <= $3 and raises its compaction
/// mark to $3. Finished runs whose last event is in that range (COMPLETED,
/// CANCELLED or deleted; see the SQLite backend for why FAILED and
/// CRASHED runs keep theirs) lose their history rows but the current
/// state, and their recorded transition results. Returns how many events,
/// history rows and transition results went.
pub(crate) const PRUNE: &str = "WITH closed AS ( \
         SELECT id FROM executions WHERE tenant_id = $1 AND id IN \
             (SELECT execution_id FROM events WHERE tenant_id = $1 AND seq > $2 AND seq <= $3) \
           AND last_seq <= $3 AND (state_type IN (4, 6) OR deleted_at IS NOT NULL) \
         UNION \
         SELECT id FROM task_runs WHERE tenant_id = $1 AND id IN \
             (SELECT task_run_id FROM events WHERE tenant_id = $1 AND seq > $2 AND seq <= $3) \
           AND last_seq <= $3 AND (state_type IN (4, 6) OR deleted_at IS NOT NULL)), \
     kept AS ( \
         SELECT s.run_id, MAX(s.pos) AS pos FROM states AS s JOIN closed AS c ON c.id = s.run_id \
         WHERE s.tenant_id = $1 GROUP BY s.run_id), \
     gone_states AS ( \
         DELETE FROM states AS s USING kept AS k \
         WHERE s.tenant_id = $1 AND s.run_id = k.run_id AND s.pos < k.pos RETURNING 1), \
     gone_transitions AS ( \
         DELETE FROM transitions AS t USING closed AS c \
         WHERE t.tenant_id = $1 AND t.run_id = c.id RETURNING 1), \
     gone_events AS ( \
         DELETE FROM events WHERE tenant_id = $1 AND seq <= $3 RETURNING 1), \
     mark AS ( \
         UPDATE tenant_heads SET compacted = GREATEST(compacted, $3) WHERE tenant_id = $1 \
         RETURNING 1) \
     SELECT (SELECT COUNT(*) FROM gone_events), (SELECT COUNT(*) FROM gone_states), \
         (SELECT COUNT(*) FROM gone_transitions), (SELECT COUNT(*) FROM mark)";
/// Tenants whose oldest event occurred before $1.
pub(crate) const TENANTS_WITH_EVENTS_BEFORE: &str = "SELECT tenant_id FROM tenant_heads AS h \
     WHERE (SELECT e.occurred_at FROM events AS e WHERE e.tenant_id = h.tenant_id \
            ORDER BY e.seq LIMIT 1) < $1";

#[cfg(test)]
mod tests {
    use crate::domain::StateType;

    /// The queries name COMPLETED, CANCELLED and the unfinished types by
    /// code.
    #[test]
    fn queries_name_state_types_by_their_codes() {
        let unfinished: Vec<i64> = StateType::ALL
            .iter()
            .filter(|t| !t.is_terminal())
            .map(|t| t.code())
            .collect();
        assert_eq!(unfinished, [1, 2, 3, 8, 9]);
        assert!(super::RUNS_OF_KEY_EXIST.contains("state_type IN (1, 2, 3, 8, 9)"));
        assert_eq!(StateType::Completed.code(), 4);
        assert!(super::LATEST_COMPLETED_OF_KEY.contains("state_type = 4 "));
        let codes = [StateType::Completed.code(), StateType::Cancelled.code()];
        assert_eq!(codes, [4, 6]);
        assert_eq!(super::PRUNE.matches("state_type IN (4, 6)").count(), 2);
    }

    #[test]
    fn heads_are_announced_on_the_events_channel() {
        let notify = format!("pg_notify('{}', ", crate::store::EVENTS_CHANNEL);
        assert!(super::SET_HEADS.contains(&notify));
        assert!(super::SEAL.contains(&notify));
    }
}
