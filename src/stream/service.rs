//! Opening the status streams: subscribe to the feed first, then read the
//! snapshot or check the cursor, then follow.

use tokio_util::sync::CancellationToken;

use super::{EventFilter, Feed, Subscription};
use crate::{
    Error, Result,
    domain::{Caller, ExecutionId, Resource, TaskRunId},
    grpc::{convert, pb},
    orchestration::Ledger,
    store::LogScope,
};

/// What the streaming services share.
#[derive(Debug, Clone)]
pub struct Streams {
    pub ledger: Ledger,
    pub feed: Feed,
    pub shutdown: CancellationToken,
}

/// Where a per-run stream starts: after its snapshot, at the log's head,
/// or at the client's cursor, reading the log from there.
struct Start {
    after: i64,
    read_log: bool,
    snapshot: Option<Snapshot>,
    /// The run is terminal at the start: nothing follows but its delete.
    ended: bool,
}

/// A per-run stream's snapshot, as of its start.
struct Snapshot {
    run: pb::StatusEvent,
    /// The first page of the execution's task runs.
    task_runs: Vec<pb::StatusEvent>,
    /// The execution whose snapshot goes on with more task runs, and the
    /// sequence their next page starts after.
    more_task_runs: Option<(ExecutionId, i64)>,
}

impl Streams {
    fn open(
        &self,
        rx: crate::stream::FeedReceiver,
        scope: LogScope,
        filter: EventFilter,
        start: Start,
    ) -> Subscription {
        let store = self.ledger.store().clone();
        let shutdown = self.shutdown.clone();
        let sub = Subscription::new(
            store,
            rx,
            scope,
            filter,
            shutdown,
            start.after,
            start.read_log,
        );
        match start.snapshot {
            Some(s) => sub.with_snapshot(s.run, s.task_runs, s.more_task_runs, start.ended),
            None => sub.ended_at_start(start.ended),
        }
    }

    /// A cursor's start: refused if retention passed it; already ended if
    /// the run is terminal and its last event is not after the cursor
    /// (but for a delete still to come).
    async fn resume_at(
        &self,
        tenant: &str,
        after: i64,
        terminal: bool,
        last_seq: i64,
    ) -> Result<Start> {
        self.check_cursor(tenant, after).await?;
        Ok(Start {
            after,
            read_log: true,
            snapshot: None,
            ended: terminal && last_seq <= after,
        })
    }

    /// Refuses a cursor retention has passed, and one beyond the log's
    /// head: no event has that sequence yet, and following from there
    /// would pass over every event up to it.
    async fn check_cursor(&self, tenant: &str, after: i64) -> Result<()> {
        let compacted = self.ledger.store().compacted_seq(tenant).await?;
        if after < compacted {
            return Err(Error::OutOfRange(format!(
                "after_sequence {after} is older than the event log's retention; the oldest sequence still held is {}",
                compacted + 1
            )));
        }
        let head = self.ledger.store().head(tenant).await?;
        if after > head {
            return Err(Error::OutOfRange(format!(
                "after_sequence {after} is beyond the event log's latest sequence {head}"
            )));
        }
        Ok(())
    }

    pub async fn execution(
        &self,
        caller: &Caller,
        id: ExecutionId,
        include_task_runs: bool,
        after: i64,
    ) -> Result<Subscription> {
        let rx = self.feed.subscribe(&caller.tenant_id);
        let store = self.ledger.store();
        let tenant = caller.tenant_id.clone();
        let filter = EventFilter {
            include_task_runs,
            ..EventFilter::default()
        };
        let scope = if include_task_runs {
            LogScope::Execution(tenant.clone(), id.to_string())
        } else {
            LogScope::ExecutionOnly(tenant.clone(), id.to_string())
        };
        let start = if after == 0 {
            let snap = store
                .execution_snapshot(&tenant, id, include_task_runs)
                .await?;
            let (exec, seq) = snap
                .execution
                .ok_or_else(|| crate::orchestration::execution_not_found(id))?;
            let task_runs = snap
                .task_runs
                .runs
                .iter()
                .map(|(t, s)| convert::snapshot(Resource::TaskRun(t), *s))
                .collect();
            Start {
                after: snap.head,
                read_log: false,
                snapshot: Some(Snapshot {
                    run: convert::snapshot(Resource::Execution(&exec), seq),
                    task_runs,
                    more_task_runs: snap.task_runs.next.map(|after| (id, after)),
                }),
                ended: exec.run.state.state_type.is_terminal(),
            }
        } else {
            let (exec, last_seq) = self.ledger.execution(caller, id).await?;
            self.resume_at(
                &tenant,
                after,
                exec.run.state.state_type.is_terminal(),
                last_seq,
            )
            .await?
        };
        Ok(self.open(rx, scope, filter, start))
    }

    pub async fn task_run(
        &self,
        caller: &Caller,
        id: TaskRunId,
        after: i64,
    ) -> Result<Subscription> {
        let rx = self.feed.subscribe(&caller.tenant_id);
        let store = self.ledger.store();
        let tenant = caller.tenant_id.clone();
        let filter = EventFilter {
            include_task_runs: true,
            ..EventFilter::default()
        };
        let scope = LogScope::TaskRun(tenant.clone(), id.to_string());
        let start = if after == 0 {
            let (run, head) = store.task_run_snapshot(&tenant, id).await?;
            let (run, seq) = run.ok_or_else(|| crate::orchestration::task_run_not_found(id))?;
            let ended = run.run.state.state_type.is_terminal();
            Start {
                after: head,
                read_log: false,
                snapshot: Some(Snapshot {
                    run: convert::snapshot(Resource::TaskRun(&run), seq),
                    task_runs: Vec::new(),
                    more_task_runs: None,
                }),
                ended,
            }
        } else {
            let (run, last_seq) = self.ledger.task_run(caller, id).await?;
            self.resume_at(
                &tenant,
                after,
                run.run.state.state_type.is_terminal(),
                last_seq,
            )
            .await?
        };
        Ok(self.open(rx, scope, filter, start))
    }

    pub async fn tenant(
        &self,
        caller: &Caller,
        filter: EventFilter,
        after: i64,
    ) -> Result<Subscription> {
        let rx = self.feed.subscribe(&caller.tenant_id);
        let scope = LogScope::Tenant(caller.tenant_id.clone());
        let start = if after == 0 {
            // Live from now: whatever committed before this is not wanted.
            let head = self.ledger.store().head(&caller.tenant_id).await?;
            Start {
                after: head,
                read_log: false,
                snapshot: None,
                ended: false,
            }
        } else {
            self.resume_at(&caller.tenant_id, after, false, 0).await?
        };
        Ok(self.open(rx, scope, filter, start))
    }
}
