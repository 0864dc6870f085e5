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
    /// a finished run (terminal or deleted) whose last event goes loses its
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
