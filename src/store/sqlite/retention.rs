//! Retention on SQLite: the old prefix of a tenant's log goes, and with it
//! what only finished runs' past needed.

use sqlx::SqliteConnection;

use super::sql;
use crate::{Result, domain::Timestamp, store::Pruned};

/// See `TxBackend::prune`.
pub(super) async fn prune(
    conn: &mut SqliteConnection,
    tenant: &str,
    cutoff: Timestamp,
    limit: i64,
) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    // Sequence order is time order: the old events are a prefix of the
    // tenant's log, ending just before the first event that is not old;
    // finding it walks only the events about to go.
    let first_kept: Option<i64> = sqlx::query_scalar(sql::FIRST_EVENT_KEPT)
        .bind(tenant)
        .bind(cutoff.as_micros())
        .fetch_optional(&mut *conn)
        .await?;
    let max: Option<i64> = match first_kept {
        Some(seq) => Some(seq - 1),
        None => {
            sqlx::query_scalar("SELECT MAX(seq) FROM events WHERE tenant_id = ?")
                .bind(tenant)
                .fetch_one(&mut *conn)
                .await?
        }
    };
    let compacted: i64 = sqlx::query_scalar(
        "SELECT COALESCE((SELECT compacted FROM tenant_heads WHERE tenant_id = ?), 0)",
    )
    .bind(tenant)
    .fetch_one(&mut *conn)
    .await?;
    let Some(max) = max.filter(|m| *m > compacted) else {
        return Ok(pruned);
    };
    let max = max.min(compacted.saturating_add(limit));
    sqlx::query(sql::CREATE_CLOSED_RUNS)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM temp.closed_runs")
        .execute(&mut *conn)
        .await?;
    sqlx::query(sql::CLOSED_RUNS_IN_RANGE)
        .bind(compacted)
        .bind(max)
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    pruned.states = sqlx::query(sql::PRUNE_CLOSED_STATES)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    pruned.transitions = sqlx::query(sql::PRUNE_CLOSED_TRANSITIONS)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    pruned.events = sqlx::query("DELETE FROM events WHERE tenant_id = ? AND seq <= ?")
        .bind(tenant)
        .bind(max)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query(
        "INSERT INTO tenant_heads (tenant_id, head, compacted) VALUES (?1, ?2, ?2) \
         ON CONFLICT (tenant_id) DO UPDATE SET compacted = MAX(compacted, excluded.compacted)",
    )
    .bind(tenant)
    .bind(max)
    .execute(&mut *conn)
    .await?;
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, SqliteConnection, migrate::Migrator, sqlite::SqliteConnectOptions};

    /// A database retention passed before finished runs' history went with
    /// their events gets the same treatment once, when it is migrated.
    #[tokio::test]
    async fn migrating_drops_the_history_of_runs_retention_already_passed() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = dir.path().join("earlier");
        std::fs::create_dir(&earlier).unwrap();
        for entry in std::fs::read_dir("migrations/sqlite").unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.as_str() < "0007" {
                std::fs::copy(&path, earlier.join(name)).unwrap();
            }
        }
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("old.db"))
            .create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
        Migrator::new(earlier.as_path())
            .await
            .unwrap()
            .run(&mut conn)
            .await
            .unwrap();
        // Retention has passed sequence 10. `done` (COMPLETED) and
        // `gone` (deleted while RUNNING) are finished; `busy` runs;
        // `failed` may be retried; `late` finished after the mark.
        let runs = [
            ("done", 4, None, 5),
            ("gone", 3, Some(1), 6),
            ("busy", 3, None, 7),
            ("failed", 5, None, 8),
            ("late", 4, None, 12),
        ];
        for (id, state_type, deleted_at, last_seq) in runs {
            sqlx::query(
                "INSERT INTO executions (id, tenant_id, created_at, state_type, deleted_at, last_seq, doc) \
                 VALUES (?, 't', 0, ?, ?, ?, '{}')",
            )
            .bind(id)
            .bind(state_type)
            .bind(deleted_at)
            .bind(last_seq)
            .execute(&mut conn)
            .await
            .unwrap();
            for n in 0..3 {
                sqlx::query(
                    "INSERT INTO states (id, tenant_id, run_id, doc) VALUES (?, 't', ?, ?)",
                )
                .bind(format!("{id}-{n}"))
                .bind(id)
                .bind(format!("{{\"n\":{n}}}"))
                .execute(&mut conn)
                .await
                .unwrap();
            }
            sqlx::query(
                "INSERT INTO transitions (run_id, transition_id, result) VALUES (?, 'x', '{}')",
            )
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        sqlx::query("UPDATE counters SET value = 10 WHERE name = 'compacted_seq'")
            .execute(&mut conn)
            .await
            .unwrap();

        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .unwrap();

        let states: Vec<String> = sqlx::query_scalar("SELECT id FROM states ORDER BY rowid")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            states,
            [
                "done-2", "gone-2", "busy-0", "busy-1", "busy-2", "failed-0", "failed-1",
                "failed-2", "late-0", "late-1", "late-2"
            ]
        );
        let transitions: Vec<String> =
            sqlx::query_scalar("SELECT run_id FROM transitions ORDER BY run_id")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(transitions, ["busy", "failed", "late"]);
    }
}
