use std::{collections::VecDeque, sync::Arc};

use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::{EventFilter, EventMessage, LoggedEvent};
use crate::{
    Error, Result,
    grpc::pb,
    store::{LogScope, Store},
};

/// How many events one read of the log returns.
const LOG_PAGE: i64 = 1000;

/// When a subscription ends by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Never,
    /// After the event that leaves this execution terminal.
    Execution(String),
    /// After the event that leaves this task run terminal.
    TaskRun(String),
}

impl Ending {
    fn reached_by(&self, e: &LoggedEvent) -> bool {
        let about_target = match self {
            Ending::Never => false,
            Ending::Execution(id) => e.task_run_id.is_none() && &e.execution_id == id,
            Ending::TaskRun(id) => e.task_run_id.as_deref() == Some(id),
        };
        about_target && crate::grpc::convert::is_terminal(e.state_type())
    }
}

/// One subscriber's position in the event stream. It was subscribed to the
/// live feed before anything was read, so nothing committed after its
/// starting point can be missed: it reads the log up to the present, then
/// follows the feed, skipping what the log already gave, and goes back to
/// the log whenever it falls behind the feed.
#[derive(Debug)]
pub struct Subscription {
    store: Store,
    rx: broadcast::Receiver<Arc<LoggedEvent>>,
    scope: LogScope,
    filter: EventFilter,
    ending: Ending,
    shutdown: CancellationToken,
    /// Every event up to here has been delivered or passed over.
    last: i64,
    /// Events ready to deliver: a snapshot, or a page of the log.
    ready: VecDeque<EventMessage>,
    read_log: bool,
    done: bool,
}

impl Subscription {
    /// Starts after sequence `after`; with `read_log` the log is read from
    /// there before following the feed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        rx: broadcast::Receiver<Arc<LoggedEvent>>,
        scope: LogScope,
        filter: EventFilter,
        ending: Ending,
        shutdown: CancellationToken,
        after: i64,
        read_log: bool,
    ) -> Self {
        Subscription {
            store,
            rx,
            scope,
            filter,
            ending,
            shutdown,
            last: after,
            ready: VecDeque::new(),
            read_log,
            done: false,
        }
    }

    /// Delivers `events` first (a snapshot); with `then_end`, nothing after.
    pub fn prepend(mut self, events: Vec<pb::StatusEvent>, then_end: bool) -> Self {
        self.ready.extend(events.into_iter().map(EventMessage::new));
        self.done = then_end;
        self
    }

    /// The next event, an error that ends the stream, or None at its end.
    pub async fn next(&mut self) -> Option<Result<EventMessage>> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            if self.shutdown.is_cancelled() {
                return self.fail(Error::Unavailable);
            }
            if self.read_log {
                if let Err(e) = self.read_log_page().await {
                    return self.fail(e);
                }
                continue;
            }
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.fail(Error::Unavailable),
                r = self.rx.recv() => r,
            };
            match received {
                Ok(e) if e.seq <= self.last => {}
                Ok(e) => {
                    self.last = e.seq;
                    // The feed carries every tenant's events; the log reads
                    // select the tenant in SQL.
                    if e.tenant_id == self.scope.tenant() && self.filter.matches(&e) {
                        self.done = self.ending.reached_by(&e);
                        return Some(Ok(e.message()));
                    }
                }
                // Fallen behind the feed: the log has everything.
                Err(RecvError::Lagged(_)) => self.read_log = true,
                Err(RecvError::Closed) => return self.fail(Error::Unavailable),
            }
        }
    }

    async fn read_log_page(&mut self) -> Result<()> {
        let page = self
            .store
            .events_after(&self.scope, self.last, LOG_PAGE)
            .await?;
        // Checked after the read: if retention removed anything past our
        // position, the page may have a hole.
        let compacted = self.store.compacted_seq().await?;
        if compacted > self.last {
            return Err(Error::OutOfRange(format!(
                "sequence {} is older than the event log's retention; the oldest sequence still held is {}",
                self.last,
                compacted + 1
            )));
        }
        self.read_log = page.len() as i64 == LOG_PAGE;
        for e in page {
            self.last = e.seq;
            if self.filter.matches(&e) {
                let ends = self.ending.reached_by(&e);
                self.ready.push_back(e.message());
                if ends {
                    self.done = true;
                    self.read_log = false;
                    break;
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: Error) -> Option<Result<EventMessage>> {
        self.done = true;
        self.ready.clear();
        Some(Err(e))
    }
}
