use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

use super::{EventFilter, EventMessage, FeedReceiver, LoggedEvent, Received};
use crate::{
    Error, Result,
    domain::{ExecutionId, Resource},
    grpc::{convert, pb},
    store::{LogScope, Store},
};

/// How many events one read of the log returns at most.
const LOG_PAGE: i64 = 1000;
/// About how many bytes of events one read of the log returns: what a
/// subscriber holds while its client is not reading.
const LOG_PAGE_BYTES: usize = 64 * 1024;

/// When a subscription ends by itself. A per-run stream ends after the
/// first event that shows its run terminal; if the run's DELETED event is
/// in the log by then, later than that event and with the run still
/// terminal, the stream delivers everything up to that DELETED event and
/// ends after it. A subscription to a tenant never ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Never,
    /// At the first event that shows the run terminal.
    AtTerminal,
    /// The run was seen terminal at this sequence: its delete, if in the
    /// log, is still to come.
    Terminal(i64),
    /// After this sequence.
    After(i64),
}

/// One subscriber's position in the event stream. It was subscribed to the
/// live feed before anything was read, so nothing committed after its
/// starting point can be missed: it reads the log up to the present, then
/// follows the feed, skipping what the log already gave, and goes back to
/// the log whenever it falls behind the feed. One [`LogScope`] selects its
/// events on both paths.
#[derive(Debug)]
pub struct Subscription {
    store: Store,
    rx: FeedReceiver,
    scope: LogScope,
    filter: EventFilter,
    end: End,
    shutdown: CancellationToken,
    /// Every event up to here has been delivered or passed over.
    last: i64,
    /// Events ready to deliver: a snapshot, or a page of the log.
    ready: VecDeque<EventMessage>,
    read_log: bool,
    done: bool,
    /// The rest of a snapshot still to read, a page at a time: its
    /// execution and the sequence its next page of task runs starts after.
    snapshot_rest: Option<(ExecutionId, i64)>,
    /// The run's own snapshot event, held back until the task runs whose
    /// latest events came before it have been delivered.
    held: Option<pb::StatusEvent>,
    /// The page of the log after the one being delivered, being read.
    ahead: Option<Ahead>,
}

/// A page of the log read and made ready to send.
#[derive(Debug)]
struct ReadyPage {
    events: Vec<LoggedEvent>,
    full: bool,
    head: i64,
}

async fn read_page(store: Store, scope: LogScope, after: i64) -> Result<ReadyPage> {
    let page = store
        .events_after(&scope, after, LOG_PAGE, LOG_PAGE_BYTES)
        .await?;
    Ok(ReadyPage {
        events: page
            .events
            .into_iter()
            .map(LoggedEvent::from_stored)
            .collect(),
        full: page.full,
        head: page.head,
    })
}

/// The read of the next page, ahead of need; stopped if not needed.
#[derive(Debug)]
struct Ahead {
    after: i64,
    task: tokio::task::JoinHandle<Result<ReadyPage>>,
}

impl Ahead {
    fn start(store: &Store, scope: &LogScope, after: i64) -> Self {
        Ahead {
            after,
            task: tokio::spawn(read_page(store.clone(), scope.clone(), after)),
        }
    }

    async fn page(mut self) -> Result<ReadyPage> {
        match (&mut self.task).await {
            Ok(page) => page,
            Err(e) => Err(Error::Internal(format!("reading the log ahead: {e}"))),
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    /// Starts after sequence `after`; with `read_log` the log is read from
    /// there before following the feed. A per-run scope ends with its run.
    pub fn new(
        store: Store,
        rx: FeedReceiver,
        scope: LogScope,
        filter: EventFilter,
        shutdown: CancellationToken,
        after: i64,
        read_log: bool,
    ) -> Self {
        let end = match scope {
            LogScope::Tenant(_) => End::Never,
            _ => End::AtTerminal,
        };
        Subscription {
            store,
            rx,
            scope,
            filter,
            end,
            shutdown,
            last: after,
            ready: VecDeque::new(),
            read_log,
            done: false,
            snapshot_rest: None,
            held: None,
            ahead: None,
        }
    }

    /// Delivers a snapshot taken at the starting point first: the run's
    /// own SNAPSHOT event and the first page of its task runs' (in the
    /// order of their sequences), then, with `rest`, the task runs of that
    /// execution whose latest events come after the given sequence and not
    /// after the starting point, read a page at a time as the client takes
    /// them. Every event of the snapshot is delivered in sequence order,
    /// and none after the starting point; see [`Self::ended_at_start`] for
    /// `run_terminal`.
    pub fn with_snapshot(
        mut self,
        run: pb::StatusEvent,
        task_runs: Vec<pb::StatusEvent>,
        rest: Option<(ExecutionId, i64)>,
        run_terminal: bool,
    ) -> Self {
        self.held = Some(run);
        self.snapshot_page(task_runs, rest);
        self.ended_at_start(run_terminal)
    }

    /// With `run_terminal`, the run was terminal at the starting point:
    /// nothing follows but its delete, should one come after that point.
    pub fn ended_at_start(mut self, run_terminal: bool) -> Self {
        if run_terminal && self.end == End::AtTerminal {
            self.end = End::Terminal(self.last);
        }
        self
    }

    /// Queues a page of the snapshot's task runs, with the run's own event
    /// in its place among them, and notes where the next page starts.
    fn snapshot_page(&mut self, task_runs: Vec<pb::StatusEvent>, rest: Option<(ExecutionId, i64)>) {
        for e in task_runs {
            if let Some(run) = self.held.take_if(|run| run.sequence < e.sequence) {
                self.ready.push_back(EventMessage::new(run));
            }
            self.ready.push_back(EventMessage::new(e));
        }
        if rest.is_none()
            && let Some(run) = self.held.take()
        {
            self.ready.push_back(EventMessage::new(run));
        }
        self.snapshot_rest = rest;
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
            if let Some((execution, after)) = self.snapshot_rest.take() {
                if let Err(e) = self.read_snapshot_page(execution, after).await {
                    return self.fail(e);
                }
                continue;
            }
            if let End::Terminal(seq) = self.end {
                match self.delete_after(seq).await {
                    Ok(Some(deleted)) => {
                        self.end = End::After(deleted);
                        self.read_log = true;
                    }
                    Ok(None) => self.done = true,
                    Err(e) => return self.fail(e),
                }
                continue;
            }
            if let End::After(seq) = self.end
                && self.last >= seq
            {
                self.done = true;
                continue;
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
                r = self.rx.next_after(self.last) => r,
            };
            match received {
                Received::Event(e) => {
                    if let Some(message) = self.take(&e) {
                        return Some(Ok(message));
                    }
                }
                // Fallen behind the feed: the log has everything.
                Received::Lagged => self.read_log = true,
                Received::Closed => return self.fail(Error::Unavailable),
            }
        }
    }

    /// Reads the next page of the snapshot's task runs. It is read later
    /// than the starting point (`last`, until the snapshot is delivered),
    /// so it leaves out the task runs changed since: their events after
    /// that point show them whole.
    async fn read_snapshot_page(&mut self, execution: ExecutionId, after: i64) -> Result<()> {
        let page = self
            .store
            .task_runs_after(self.scope.tenant(), execution, after, self.last)
            .await?;
        let events = page
            .runs
            .iter()
            .map(|(run, seq)| convert::snapshot(Resource::TaskRun(run), *seq))
            .collect();
        self.snapshot_page(events, page.next.map(|after| (execution, after)));
        Ok(())
    }

    /// Moves past `e`, the next event after `last`: the message to
    /// deliver if it is in scope and matches the filter.
    fn take(&mut self, e: &LoggedEvent) -> Option<EventMessage> {
        self.last = e.seq;
        if !self.scope.matches(&e.ids()) || !self.filter.matches(e) {
            return None;
        }
        if self.end == End::AtTerminal
            && self.scope.is_own(&e.ids())
            && convert::is_terminal(e.state_type())
        {
            self.end = End::Terminal(e.seq);
        }
        Some(e.message())
    }

    /// Reads the next page of the log. While a full page is delivered, the
    /// page after it is read and made ready beside it (one page ahead, on
    /// another worker), so that a subscriber catching up waits neither for
    /// the database nor for turning records into messages in turn.
    async fn read_log_page(&mut self) -> Result<()> {
        let page = match self.ahead.take() {
            Some(ahead) if ahead.after == self.last => ahead.page().await?,
            _ => read_page(self.store.clone(), self.scope.clone(), self.last).await?,
        };
        if page.full
            && let Some(last) = page.events.last()
        {
            self.ahead = Some(Ahead::start(&self.store, &self.scope, last.seq));
        }
        // Checked after the read: if retention removed anything past our
        // position, the page may have a hole.
        self.check_retention().await?;
        let mut passed_all = true;
        for e in page.events {
            if let End::After(seq) = self.end
                && e.seq > seq
            {
                passed_all = false;
                break;
            }
            if let Some(message) = self.take(&e) {
                self.ready.push_back(message);
            }
            if matches!(self.end, End::Terminal(_)) {
                // What follows depends on the run's delete.
                passed_all = false;
                break;
            }
        }
        if passed_all && !page.full {
            // The scope has nothing more up to the head the read saw:
            // move there, past what other scopes wrote, so the feed is
            // followed from the present and not from the last event of
            // a quiet scope it no longer holds.
            self.last = self.last.max(page.head);
        }
        self.read_log = page.full || matches!(self.end, End::After(seq) if self.last < seq);
        Ok(())
    }

    /// The sequence of the run's DELETED event if the log has one after
    /// `seq` with nothing in between showing the run not terminal.
    async fn delete_after(&self, seq: i64) -> Result<Option<i64>> {
        let Some(run) = self.scope.run() else {
            return Ok(None);
        };
        let mut after = seq;
        loop {
            let page = self
                .store
                .events_after(&run, after, LOG_PAGE, LOG_PAGE_BYTES)
                .await?;
            let full = page.full;
            let page: Vec<LoggedEvent> = page
                .events
                .into_iter()
                .map(LoggedEvent::from_stored)
                .collect();
            // No retention check: a delete old enough to be pruned is not
            // looked for; the stream ends where it is.
            match last_word(&page) {
                Word::Deleted(seq) => return Ok(Some(seq)),
                Word::Reopened => return Ok(None),
                Word::Undecided if full => {
                    after = page.last().map_or(after, |e| e.seq);
                }
                Word::Undecided => return Ok(None),
            }
        }
    }

    /// Refuses to go on from `last` if retention removed events after it:
    /// a read from there may have a hole.
    async fn check_retention(&self) -> Result<()> {
        let position = self.last;
        let compacted = self.store.compacted_seq(self.scope.tenant()).await?;
        if compacted > position {
            return Err(Error::OutOfRange(format!(
                "sequence {position} is older than the event log's retention; the oldest sequence still held is {}",
                compacted + 1
            )));
        }
        Ok(())
    }

    fn fail(&mut self, e: Error) -> Option<Result<EventMessage>> {
        self.done = true;
        self.ready.clear();
        Some(Err(e))
    }
}

/// What a terminal run's own later events say about its end.
#[derive(Debug, PartialEq, Eq)]
enum Word {
    /// It was deleted while terminal, at this sequence.
    Deleted(i64),
    /// It left the terminal state before any delete.
    Reopened,
    /// Still terminal and not deleted as far as these events go.
    Undecided,
}

/// Reads a terminal run's own events, in order, after the point it was
/// seen terminal: the first DELETED event is its last word, unless an
/// event before it shows the run no longer terminal (a forced transition).
fn last_word(events: &[LoggedEvent]) -> Word {
    for e in events {
        if e.event().kind == pb::EventKind::Deleted as i32 {
            return Word::Deleted(e.seq);
        }
        if !convert::is_terminal(e.state_type()) {
            return Word::Reopened;
        }
    }
    Word::Undecided
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn event(seq: i64, kind: pb::EventKind, state: pb::StateType) -> LoggedEvent {
        let status = pb::StatusEvent {
            sequence: seq,
            kind: kind as i32,
            resource: Some(pb::status_event::Resource::TaskRun(pb::TaskRun {
                state: Some(pb::State {
                    r#type: state as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        LoggedEvent::from_log(
            seq,
            "t".into(),
            "e".into(),
            Some("r".into()),
            None,
            &status.encode_to_vec(),
        )
    }

    #[test]
    fn a_terminal_runs_delete_is_its_last_word_unless_it_was_reopened_first() {
        use pb::{EventKind::*, StateType::*};
        let stale = event(5, Updated, Completed);
        let deleted = event(6, Deleted, Completed);
        let reopened = event(7, StateChanged, Running);
        assert_eq!(
            last_word(&[stale.clone(), deleted.clone()]),
            Word::Deleted(6)
        );
        assert_eq!(last_word(&[reopened, deleted]), Word::Reopened);
        assert_eq!(last_word(&[stale]), Word::Undecided);
        assert_eq!(last_word(&[]), Word::Undecided);
    }
}
