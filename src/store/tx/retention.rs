//! Retention, as the writer applies it: the old prefix of the event log
//! goes, and with it what only finished runs' past needed.

use super::WriteTx;
use crate::{Result, domain::Timestamp, store::sql};

/// What one round of retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    /// History rows of finished runs.
    pub states: u64,
    /// Recorded transition results of finished runs.
    pub transitions: u64,
    /// Expired cache entries.
    pub cache_entries: u64,
}

impl WriteTx<'_> {
    /// Applies retention: removes up to `limit` of the events that occurred
    /// before `cutoff` (the oldest first) and raises the compaction mark;
    /// a finished run (COMPLETED, CANCELLED or deleted) whose last event goes loses its
    /// older history rows and its recorded transition results, keeping its
    /// current state; cache entries expired by `now` go too.
    pub(crate) async fn prune(
        &mut self,
        cutoff: Timestamp,
        now: Timestamp,
        limit: i64,
    ) -> Result<Pruned> {
        self.flush().await?;
        let mut pruned = Pruned::default();
        self.writes_in_op += 1;
        pruned.cache_entries = sqlx::query(sql::EXPIRED_CACHE_ENTRIES)
            .bind(now.as_micros())
            .execute(&mut *self.conn)
            .await?
            .rows_affected();
        // Sequence order is time order: the old events are a prefix of the
        // log, ending just before the first event that is not old; finding
        // it walks only the events about to go.
        let first_kept: Option<i64> = sqlx::query_scalar(sql::FIRST_EVENT_KEPT)
            .bind(cutoff.as_micros())
            .fetch_optional(&mut *self.conn)
            .await?;
        let max: Option<i64> = match first_kept {
            Some(seq) => Some(seq - 1),
            None => {
                sqlx::query_scalar("SELECT MAX(seq) FROM events")
                    .fetch_one(&mut *self.conn)
                    .await?
            }
        };
        let compacted: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'compacted_seq'")
                .fetch_one(&mut *self.conn)
                .await?;
        let Some(max) = max.filter(|m| *m > compacted) else {
            return Ok(pruned);
        };
        let max = max.min(compacted.saturating_add(limit));
        sqlx::query(sql::CREATE_CLOSED_RUNS)
            .execute(&mut *self.conn)
            .await?;
        sqlx::query("DELETE FROM temp.closed_runs")
            .execute(&mut *self.conn)
            .await?;
        sqlx::query(sql::CLOSED_RUNS_IN_RANGE)
            .bind(compacted)
            .bind(max)
            .execute(&mut *self.conn)
            .await?;
        pruned.states = sqlx::query(sql::PRUNE_CLOSED_STATES)
            .execute(&mut *self.conn)
            .await?
            .rows_affected();
        pruned.transitions = sqlx::query(sql::PRUNE_CLOSED_TRANSITIONS)
            .execute(&mut *self.conn)
            .await?
            .rows_affected();
        pruned.events = sqlx::query("DELETE FROM events WHERE seq <= ?")
            .bind(max)
            .execute(&mut *self.conn)
            .await?
            .rows_affected();
        sqlx::query("UPDATE counters SET value = MAX(value, ?) WHERE name = 'compacted_seq'")
            .bind(max)
            .execute(&mut *self.conn)
            .await?;
        Ok(pruned)
    }
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
        for entry in std::fs::read_dir("migrations").unwrap() {
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

        sqlx::migrate!("./migrations").run(&mut conn).await.unwrap();

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
