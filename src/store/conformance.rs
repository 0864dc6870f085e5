//! What every storage backend must do, written once and run against each:
//! [`conformance_suite!`] expands, for a function that opens a fresh store,
//! into one test per check. The checks drive the store through the ledger
//! (`orchestration::Ledger`) and read it through the store's own API, never
//! through SQL, so that the same checks hold any backend to the same
//! behaviour: dense per-tenant sequences in commit order, reads of the log
//! by scope and cursor within their bounds, idempotency under concurrency,
//! snapshots consistent with the head they report, exact list pages,
//! documents that come back as they went in, retention, the pause sweep,
//! and a writer that survives a failing operation.
//!
//! A backend opts in with
//!
//! ```ignore
//! mod conformance {
//!     async fn open(listener: Arc<dyn CommitListener>) -> (Store, Guard) { ... }
//!     crate::store::conformance_suite!(open);
//! }
//! ```
//!
//! where `open` returns a store on a database of its own and whatever keeps
//! that database alive (a temporary directory, a scratch database) for as
//! long as the check runs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Map, Value, json};

use super::{
    Cursor, EventBody, EventFormat, ExecutionFilter, HistoryPage, LogPage, LogScope, Page,
    SNAPSHOT_PAGE, Store, StoredEvent, TaskRunFilter,
};
use crate::{
    Error,
    domain::{
        Caller, ConfigOverrides, ConfigProfile, EffectiveConfig, ErrorInfo, Event, EventKind,
        EventRecord, Execution, ExecutionId, NewExecution, NewTaskRun, RecordedRun, Resource,
        RetryPolicy, RunCore, State, StateProposal, StateType, TaskRun, TaskRunId, Timestamp,
        document,
    },
    orchestration::{
        Ledger, SetStateOutcome,
        rules::{CACHED, PAUSE_TIMEOUT, Payload, Proposal, Status},
    },
};

/// What keeps a backend's database alive while a check runs.
pub(crate) type Guard = Box<dyn std::any::Any + Send>;

/// Expands into one `#[tokio::test]` per check for the backend that `$open`
/// opens: an `async fn(Arc<dyn CommitListener>) -> (Store, Guard)` that
/// opens a store on a fresh database.
macro_rules! conformance_suite {
    ($open:expr) => {
        $crate::store::conformance_tests!(
            $open;
            sequences_are_dense_per_tenant_in_commit_order,
            events_after_reads_each_scope_from_its_cursor,
            events_after_stops_at_its_limit_and_byte_bound,
            events_after_reads_the_head_with_its_page,
            a_repeated_request_id_finds_the_one_execution,
            a_repeated_task_run_key_finds_the_one_run,
            a_repeated_transition_id_gets_the_first_result,
            snapshots_hold_task_runs_by_their_latest_event,
            snapshots_reflect_exactly_their_head,
            execution_lists_filter_and_go_newest_first,
            task_run_lists_filter_and_go_newest_first,
            list_pages_stay_exact_while_rows_are_inserted,
            list_pages_are_bounded_by_bytes,
            history_pages_go_oldest_first,
            documents_round_trip_exactly,
            retention_prunes_each_tenant_and_keeps_what_may_be_retried,
            the_pause_sweep_fails_expired_pauses_once,
            a_failing_write_fails_alone,
        );
    };
}

/// The tests [`conformance_suite!`] expands into, one per named check.
macro_rules! conformance_tests {
    ($open:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let backend = $crate::store::conformance::Backend::open($open).await;
                $crate::store::conformance::$check(backend).await;
            }
        )*
    };
}

pub(crate) use {conformance_suite, conformance_tests};

/// A store under test, the ledger on it, and what its writer told
/// subscribers.
pub(crate) struct Backend {
    store: Store,
    ledger: Ledger,
    heard: Arc<Heard>,
    _guard: Guard,
}

impl Backend {
    pub(crate) async fn open<F, Fut>(open: F) -> Self
    where
        F: FnOnce(Arc<dyn super::CommitListener>) -> Fut,
        Fut: Future<Output = (Store, Guard)>,
    {
        let heard = Arc::new(Heard::default());
        let (store, guard) = open(Arc::clone(&heard) as Arc<dyn super::CommitListener>).await;
        Backend {
            ledger: Ledger::new(store.clone()),
            store,
            heard,
            _guard: guard,
        }
    }
}

/// A commit listener that keeps every event it is told of, in the order
/// it hears them: what live subscribers would be sent.
#[derive(Default)]
pub(crate) struct Heard {
    events: Mutex<Vec<StoredEvent>>,
}

impl super::CommitListener for Heard {
    fn committed(&self, events: Vec<StoredEvent>, answer: super::Answer) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(events);
        answer();
    }
}

impl Heard {
    fn events(&self) -> Vec<StoredEvent> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The sequences heard for `tenant`, in the order heard.
    fn seqs_of(&self, tenant: &str) -> Vec<i64> {
        self.events()
            .iter()
            .filter(|e| e.tenant_id == tenant)
            .map(|e| e.seq)
            .collect()
    }
}

// Requests, as a client would make them.

fn caller(tenant: &str) -> Caller {
    Caller {
        tenant_id: tenant.into(),
        name: format!("{tenant}-key"),
    }
}

fn new_execution() -> NewExecution {
    NewExecution {
        task_id: None,
        name: String::new(),
        input: Map::new(),
        goal: Some("conformance".into()),
        max_depth: 3,
        config_profile: ConfigProfile::General,
        config_overrides: ConfigOverrides::default(),
        metadata: BTreeMap::new(),
        request_id: None,
        initial_state: None,
    }
}

/// A new execution of `tenant` as the ledger would make it, created at
/// `at`.
pub(crate) fn execution_at(tenant: &str, at: Timestamp, request_id: Option<&str>) -> Execution {
    let new = new_execution();
    Execution {
        id: ExecutionId::new(),
        tenant_id: tenant.to_string(),
        task_id: new.task_id,
        name: new.name,
        input: new.input,
        goal: new.goal,
        max_depth: new.max_depth,
        config_profile: new.config_profile,
        effective_config: EffectiveConfig::resolve(new.config_profile, &new.config_overrides),
        config_overrides: new.config_overrides,
        metadata: new.metadata,
        request_id: request_id.map(str::to_owned),
        run: RunCore::new(
            StateProposal::of_type(StateType::Pending).into_state(at),
            "conformance",
        ),
    }
}

fn new_task_run(execution_id: ExecutionId, task_key: &str) -> NewTaskRun {
    NewTaskRun {
        execution_id,
        task_key: task_key.into(),
        dynamic_key: None,
        name: String::new(),
        parent_task_run_id: None,
        task_version: None,
        cache_key: None,
        cache_expiration: None,
        retry_policy: RetryPolicy::default(),
        tags: Vec::new(),
        labels: BTreeMap::new(),
        input: json!({}),
        initial_state: None,
    }
}

fn propose(state_type: StateType) -> Proposal {
    Proposal {
        state: StateProposal::of_type(state_type),
        force: false,
        expected_state_id: None,
        payload: Payload::default(),
    }
}

fn with_transition_id(mut p: Proposal, id: &str) -> Proposal {
    p.state.details.transition_id = Some(id.into());
    p
}

fn with_output(mut p: Proposal, output: Value) -> Proposal {
    p.payload.output = Some(output);
    p
}

fn paused_until(deadline: Timestamp) -> Proposal {
    let mut p = propose(StateType::Paused);
    p.state.details.pause_timeout = Some(deadline);
    p
}

fn in_(d: Duration) -> Timestamp {
    Timestamp::now().checked_add(d).unwrap()
}

fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// Reading the log.

/// Every event of `scope` after `after`, page by page.
async fn events(store: &Store, scope: &LogScope, mut after: i64) -> Vec<StoredEvent> {
    let mut all = Vec::new();
    loop {
        let page = store
            .events_after(scope, after, 1000, usize::MAX)
            .await
            .unwrap();
        let full = page.full;
        if let Some(last) = page.events.last() {
            after = last.seq;
        }
        all.extend(page.events);
        if !full {
            return all;
        }
    }
}

fn seqs(events: &[StoredEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

/// The ledger's record an event holds, whichever way it was read.
fn record(e: &StoredEvent) -> EventRecord {
    match &e.body {
        EventBody::Record(r) => (**r).clone(),
        EventBody::Stored {
            format: EventFormat::Record,
            bytes,
        } => EventRecord::decode(bytes).unwrap(),
        EventBody::Stored { format, .. } => panic!("event {} stored as {format:?}", e.seq),
    }
}

/// The bytes a log read counts for an event.
fn stored_len(e: &StoredEvent) -> usize {
    match &e.body {
        EventBody::Stored { bytes, .. } => bytes.len(),
        EventBody::Record(r) => r.encode().unwrap().len(),
    }
}

fn recorded_execution(e: &StoredEvent) -> Execution {
    match record(e).run {
        RecordedRun::Execution(x) => x,
        RecordedRun::TaskRun(t) => panic!("event {} is about task run {}", e.seq, t.id),
    }
}

fn recorded_task_run(e: &StoredEvent) -> TaskRun {
    match record(e).run {
        RecordedRun::TaskRun(t) => t,
        RecordedRun::Execution(x) => panic!("event {} is about execution {}", e.seq, x.id),
    }
}

/// The id of the run an event is about.
fn run_of(e: &StoredEvent) -> &str {
    e.task_run_id.as_deref().unwrap_or(&e.execution_id)
}

async fn all_states(store: &Store, tenant: &str, run_id: &str) -> Vec<State> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let (states, next) = store
            .states(tenant, run_id, &HistoryPage { size: 1000, after })
            .await
            .unwrap();
        all.extend(states);
        match next {
            Some(token) => after = HistoryPage::new(1000, &token).unwrap().after,
            None => return all,
        }
    }
}

fn ids<T, I: ToString>(runs: &[T], id: impl Fn(&T) -> I) -> Vec<String> {
    runs.iter().map(|r| id(r).to_string()).collect()
}

fn exec_ids(runs: &[Execution]) -> Vec<String> {
    ids(runs, |e| e.id)
}

fn task_run_ids(runs: &[TaskRun]) -> Vec<String> {
    ids(runs, |t| t.id)
}

/// Every page of an execution list, following the cursors.
async fn list_all_executions(
    store: &Store,
    tenant: &str,
    filter: &ExecutionFilter,
    size: u32,
) -> Vec<Vec<Execution>> {
    let mut pages = Vec::new();
    let mut after: Option<Cursor> = None;
    loop {
        let (runs, next) = store
            .list_executions(tenant, filter, &Page { size, after })
            .await
            .unwrap();
        pages.push(runs);
        match next {
            Some(c) => after = Some(c),
            None => return pages,
        }
    }
}

async fn list_executions(store: &Store, tenant: &str, filter: ExecutionFilter) -> Vec<String> {
    let pages = list_all_executions(store, tenant, &filter, 1000).await;
    assert_eq!(pages.len(), 1, "a small list fits in one page");
    exec_ids(&pages[0])
}

async fn list_task_runs(store: &Store, tenant: &str, filter: TaskRunFilter) -> Vec<String> {
    let (runs, next) = store
        .list_task_runs(
            tenant,
            &filter,
            &Page {
                size: 1000,
                after: None,
            },
        )
        .await
        .unwrap();
    assert!(next.is_none(), "a small list fits in one page");
    task_run_ids(&runs)
}

/// Newest first: by creation time, then id, descending.
fn newest_first(runs: &[Execution]) -> Vec<String> {
    let mut sorted: Vec<&Execution> = runs.iter().collect();
    sorted.sort_by(|a, b| {
        (b.run.created_at, b.id.to_string()).cmp(&(a.run.created_at, a.id.to_string()))
    });
    sorted.iter().map(|e| e.id.to_string()).collect()
}

/// Executions created at one instant, written as the ledger writes a new
/// execution (its first state, its CREATED event, the run), in one
/// transaction.
async fn executions_created_at(
    store: &Store,
    tenant: &str,
    at: Timestamp,
    n: usize,
) -> Vec<Execution> {
    let owner: Arc<str> = tenant.into();
    store
        .write(tenant, move |tx| {
            let tenant = Arc::clone(&owner);
            Box::pin(async move {
                let mut made = Vec::new();
                for _ in 0..n {
                    let e = execution_at(&tenant, at, None);
                    tx.append_state(&tenant, &e.id.to_string(), &e.run.state)
                        .await?;
                    let seq = tx
                        .append_event(&Event {
                            kind: EventKind::Created,
                            occurred_at: at,
                            previous_state_type: None,
                            resource: Resource::Execution(&e),
                            task_id: None,
                        })
                        .await?;
                    tx.save_execution(&e, None, seq).await?;
                    made.push(e);
                }
                Ok(made)
            })
        })
        .await
        .unwrap()
}

/// Task runs of `execution` created at one instant, written as the ledger
/// writes a new task run, in one transaction.
async fn task_runs_created_at(
    store: &Store,
    tenant: &str,
    execution: ExecutionId,
    at: Timestamp,
    n: usize,
) -> Vec<TaskRun> {
    let owner: Arc<str> = tenant.into();
    store
        .write(tenant, move |tx| {
            let tenant = Arc::clone(&owner);
            Box::pin(async move {
                let mut made = Vec::new();
                for i in 0..n {
                    let new = new_task_run(execution, "tied");
                    let t = TaskRun {
                        id: TaskRunId::new(),
                        tenant_id: tenant.to_string(),
                        execution_id: execution,
                        parent_task_run_id: None,
                        depth: 1,
                        task_key: new.task_key,
                        dynamic_key: format!("tied-{i}"),
                        name: format!("tied-{i}"),
                        task_version: None,
                        cache_key: None,
                        cache_expiration: None,
                        retry_policy: new.retry_policy,
                        tags: new.tags,
                        labels: new.labels,
                        input: new.input,
                        resolved_input: None,
                        task_inputs: Vec::new(),
                        stale: false,
                        run: RunCore::new(
                            StateProposal::of_type(StateType::Pending).into_state(at),
                            "conformance",
                        ),
                    };
                    tx.append_state(&tenant, &t.id.to_string(), &t.run.state)
                        .await?;
                    let seq = tx
                        .append_event(&Event {
                            kind: EventKind::Created,
                            occurred_at: at,
                            previous_state_type: None,
                            resource: Resource::TaskRun(&t),
                            task_id: None,
                        })
                        .await?;
                    tx.save_task_run(&t, seq).await?;
                    made.push(t);
                }
                Ok(made)
            })
        })
        .await
        .unwrap()
}

/// Lets the clock move on, so that runs created on either side differ in
/// creation time.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(3)).await;
}

// The checks.

/// Two tenants write concurrently through the ledger: each tenant's log is
/// numbered 1..N with no gap and no number taken by the other, the head is
/// N, every run points at its latest event, and the listener hears every
/// committed event once, each tenant's in order.
pub(crate) async fn sequences_are_dense_per_tenant_in_commit_order(b: Backend) {
    const RUNS: usize = 40;
    let mut tasks = Vec::new();
    for _ in 0..RUNS {
        for tenant in ["a", "b"] {
            let ledger = b.ledger.clone();
            tasks.push(tokio::spawn(async move {
                let c = caller(tenant);
                let (e, created) = ledger.create_execution(&c, new_execution()).await.unwrap();
                assert!(created);
                ledger
                    .set_execution_state(&c, e.id, propose(StateType::Running))
                    .await
                    .unwrap();
                let (t, _) = ledger
                    .create_task_run(&c, new_task_run(e.id, "step"))
                    .await
                    .unwrap();
                (tenant, e.id, t.id)
            }));
        }
    }
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await.unwrap());
    }
    let n = 3 * RUNS as i64;
    for tenant in ["a", "b"] {
        let log = events(&b.store, &LogScope::Tenant(tenant.into()), 0).await;
        assert_eq!(seqs(&log), (1..=n).collect::<Vec<_>>(), "tenant {tenant}");
        assert!(log.iter().all(|e| e.tenant_id == tenant));
        assert_eq!(b.store.head(tenant).await.unwrap(), n);
        let page = b
            .store
            .events_after(&LogScope::Tenant(tenant.into()), 0, 1000, usize::MAX)
            .await
            .unwrap();
        assert_eq!((page.head, page.full), (n, false));

        // Each run's latest event is the one its row points at, and an
        // execution's events come in the order it changed.
        let mut latest: HashMap<&str, i64> = HashMap::new();
        for e in &log {
            latest.insert(run_of(e), e.seq);
        }
        for (_, exec, task_run) in runs.iter().filter(|r| r.0 == tenant) {
            let (x, seq) = b.store.execution(tenant, *exec).await.unwrap().unwrap();
            assert_eq!(latest[x.id.to_string().as_str()], seq);
            assert_eq!(x.run.state.state_type, StateType::Running);
            let (t, seq) = b.store.task_run(tenant, *task_run).await.unwrap().unwrap();
            assert_eq!(latest[t.id.to_string().as_str()], seq);
            let own = events(
                &b.store,
                &LogScope::ExecutionOnly(tenant.into(), exec.to_string()),
                0,
            )
            .await;
            let kinds: Vec<EventKind> = own.iter().map(|e| record(e).kind).collect();
            assert_eq!(kinds, [EventKind::Created, EventKind::StateChanged]);
        }

        // The listener heard each event once, in the tenant's order, and
        // what it heard is what the log holds.
        assert_eq!(b.heard.seqs_of(tenant), (1..=n).collect::<Vec<_>>());
        let heard: HashMap<i64, EventRecord> = b
            .heard
            .events()
            .iter()
            .filter(|e| e.tenant_id == tenant)
            .map(|e| (e.seq, record(e)))
            .collect();
        for e in &log {
            assert_eq!(heard[&e.seq], record(e), "event {} of {tenant}", e.seq);
        }
    }
    assert_eq!(b.heard.events().len() as i64, 2 * n);
    assert_eq!(
        b.store.head("c").await.unwrap(),
        0,
        "a tenant without writes"
    );
    let heads = b
        .store
        .heads(&["a".into(), "b".into(), "c".into()])
        .await
        .unwrap();
    assert_eq!((heads.get("a"), heads.get("b")), (Some(&n), Some(&n)));
    assert_eq!(heads.get("c").copied().unwrap_or(0), 0);
}

/// What one change of a scripted history touched.
struct Step {
    execution: ExecutionId,
    task_run: Option<TaskRunId>,
    kind: EventKind,
}

/// Which steps of a [`Script`] a scope selects.
type Selects<'a> = Box<dyn Fn(&Step) -> bool + 'a>;

/// A small history in tenant "a" (and some of tenant "b", which no read of
/// "a" may show): two executions, three task runs across them.
struct Script {
    e1: Execution,
    e2: Execution,
    t1: TaskRun,
    t3: TaskRun,
    steps: Vec<Step>,
}

async fn script(b: &Backend) -> Script {
    let (a, other) = (caller("a"), caller("b"));
    let l = &b.ledger;
    let mut steps = Vec::new();
    let mut step = |execution: ExecutionId, task_run: Option<TaskRunId>, kind| {
        steps.push(Step {
            execution,
            task_run,
            kind,
        });
    };
    let (e1, _) = l.create_execution(&a, new_execution()).await.unwrap();
    step(e1.id, None, EventKind::Created);
    let (x, _) = l.create_execution(&other, new_execution()).await.unwrap();
    let (e2, _) = l.create_execution(&a, new_execution()).await.unwrap();
    step(e2.id, None, EventKind::Created);
    l.set_execution_state(&a, e1.id, propose(StateType::Running))
        .await
        .unwrap();
    step(e1.id, None, EventKind::StateChanged);
    let (t1, _) = l
        .create_task_run(&a, new_task_run(e1.id, "fetch"))
        .await
        .unwrap();
    step(e1.id, Some(t1.id), EventKind::Created);
    l.set_execution_state(&other, x.id, propose(StateType::Running))
        .await
        .unwrap();
    let (t3, _) = l
        .create_task_run(&a, new_task_run(e2.id, "fetch"))
        .await
        .unwrap();
    step(e2.id, Some(t3.id), EventKind::Created);
    let (t2, _) = l
        .create_task_run(&a, new_task_run(e1.id, "parse"))
        .await
        .unwrap();
    step(e1.id, Some(t2.id), EventKind::Created);
    l.set_task_run_state(&a, t1.id, propose(StateType::Running))
        .await
        .unwrap();
    step(e1.id, Some(t1.id), EventKind::StateChanged);
    let done = l
        .set_task_run_state(
            &a,
            t1.id,
            with_output(propose(StateType::Completed), json!({"rows": 3})),
        )
        .await
        .unwrap();
    step(e1.id, Some(t1.id), EventKind::StateChanged);
    l.set_execution_state(&a, e2.id, propose(StateType::Running))
        .await
        .unwrap();
    step(e2.id, None, EventKind::StateChanged);
    l.delete_task_run(&a, t2.id).await.unwrap();
    step(e1.id, Some(t2.id), EventKind::Deleted);
    let (e1, _) = b.store.execution("a", e1.id).await.unwrap().unwrap();
    let (e2, _) = b.store.execution("a", e2.id).await.unwrap().unwrap();
    Script {
        e1,
        e2,
        t1: done.run,
        t3,
        steps,
    }
}

/// Each scope reads exactly its events (a tenant's, an execution's with or
/// without its task runs', a task run's), from any cursor, in order, with
/// record bodies that decode to the runs as they were written.
pub(crate) async fn events_after_reads_each_scope_from_its_cursor(b: Backend) {
    let s = script(&b).await;
    let head = s.steps.len() as i64;
    assert_eq!(b.store.head("a").await.unwrap(), head);
    let log = events(&b.store, &LogScope::Tenant("a".into()), 0).await;
    assert_eq!(seqs(&log), (1..=head).collect::<Vec<_>>());
    for (e, step) in log.iter().zip(&s.steps) {
        assert_eq!(
            e.execution_id,
            step.execution.to_string(),
            "event {}",
            e.seq
        );
        assert_eq!(e.task_run_id, step.task_run.map(|t| t.to_string()));
        assert_eq!(record(e).kind, step.kind, "event {}", e.seq);
    }

    let e1 = s.e1.id.to_string();
    let t1 = s.t1.id.to_string();
    let scopes: Vec<(LogScope, Selects<'_>)> = vec![
        (LogScope::Tenant("a".into()), Box::new(|_| true)),
        (
            LogScope::Execution("a".into(), e1.clone()),
            Box::new(|st| st.execution == s.e1.id),
        ),
        (
            LogScope::ExecutionOnly("a".into(), e1.clone()),
            Box::new(|st| st.execution == s.e1.id && st.task_run.is_none()),
        ),
        (
            LogScope::TaskRun("a".into(), t1.clone()),
            Box::new(|st| st.task_run == Some(s.t1.id)),
        ),
        // Another tenant's ids read nothing.
        (
            LogScope::Execution("b".into(), e1.clone()),
            Box::new(|_| false),
        ),
        (
            LogScope::TaskRun("b".into(), t1.clone()),
            Box::new(|_| false),
        ),
    ];
    for (scope, wanted) in &scopes {
        let expected: Vec<i64> = (1..=head)
            .filter(|seq| wanted(&s.steps[*seq as usize - 1]))
            .collect();
        for after in 0..=head {
            let page = b
                .store
                .events_after(scope, after, 1000, usize::MAX)
                .await
                .unwrap();
            let want: Vec<i64> = expected.iter().copied().filter(|s| *s > after).collect();
            assert_eq!(seqs(&page.events), want, "{scope:?} after {after}");
            assert!(!page.full, "{scope:?} after {after}: no bound was reached");
            assert_eq!(page.head, b.store.head(scope.tenant()).await.unwrap());
            for e in &page.events {
                assert!(scope.matches(&e.ids()), "{scope:?} read event {}", e.seq);
            }
        }
    }

    // Bodies decode to the runs as the ledger returned them.
    let t1_events = events(&b.store, &LogScope::TaskRun("a".into(), t1), 0).await;
    let last = t1_events.last().unwrap();
    assert_eq!(recorded_task_run(last), s.t1);
    let r = record(last);
    assert_eq!(r.previous_state_type, Some(StateType::Running));
    assert_eq!(r.task_id, None);
    let e1_own = events(&b.store, &LogScope::ExecutionOnly("a".into(), e1), 0).await;
    assert_eq!(recorded_execution(e1_own.last().unwrap()), s.e1);
    let e2_own = events(
        &b.store,
        &LogScope::ExecutionOnly("a".into(), s.e2.id.to_string()),
        0,
    )
    .await;
    assert_eq!(recorded_execution(e2_own.last().unwrap()), s.e2);
    let t3_events = events(
        &b.store,
        &LogScope::TaskRun("a".into(), s.t3.id.to_string()),
        0,
    )
    .await;
    assert_eq!(recorded_task_run(&t3_events[0]), s.t3);
}

/// A read stops at its limit, or once the events it holds reach its byte
/// bound (always holding at least one), and says so with `full`.
pub(crate) async fn events_after_stops_at_its_limit_and_byte_bound(b: Backend) {
    let s = script(&b).await;
    let head = s.steps.len() as i64;
    let tenant = LogScope::Tenant("a".into());

    let page = b
        .store
        .events_after(&tenant, 2, 3, usize::MAX)
        .await
        .unwrap();
    assert_eq!(seqs(&page.events), [3, 4, 5]);
    assert!(page.full, "the limit stopped the read");
    let page = b
        .store
        .events_after(&tenant, head - 2, 3, usize::MAX)
        .await
        .unwrap();
    assert_eq!(seqs(&page.events), [head - 1, head]);
    assert!(!page.full);
    let page = b
        .store
        .events_after(&tenant, head, 3, usize::MAX)
        .await
        .unwrap();
    assert!(page.events.is_empty() && !page.full);

    for scope in [
        tenant.clone(),
        LogScope::Execution("a".into(), s.e1.id.to_string()),
    ] {
        let all = events(&b.store, &scope, 0).await;
        let sizes: Vec<usize> = all.iter().map(stored_len).collect();
        let total: usize = sizes.iter().sum();
        let mut bounds = vec![1, total, total + 1];
        let mut sum = 0;
        for size in &sizes {
            sum += size;
            bounds.extend([sum - 1, sum, sum + 1]);
        }
        for max_bytes in bounds.into_iter().filter(|m| *m > 0) {
            let page = b
                .store
                .events_after(&scope, 0, 1000, max_bytes)
                .await
                .unwrap();
            // The read holds events until their bytes reach the bound.
            let mut held = 0;
            let mut expected = 0;
            for size in &sizes {
                held += size;
                expected += 1;
                if held >= max_bytes {
                    break;
                }
            }
            assert_eq!(
                seqs(&page.events),
                seqs(&all[..expected]),
                "{scope:?} within {max_bytes} bytes"
            );
            assert_eq!(page.full, held >= max_bytes, "{scope:?} within {max_bytes}");
        }
    }
}

/// The head a read returns is the log's as the read saw it: the page holds
/// nothing after it, and when the page is not full the scope has nothing
/// more up to it, even while writes go on.
pub(crate) async fn events_after_reads_the_head_with_its_page(b: Backend) {
    let a = caller("a");
    let (e1, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    b.ledger
        .set_execution_state(&a, e1.id, propose(StateType::Running))
        .await
        .unwrap();
    let writer = {
        let ledger = b.ledger.clone();
        tokio::spawn(async move {
            let a = caller("a");
            for i in 0..60 {
                if i % 3 == 0 {
                    let (t, _) = ledger
                        .create_task_run(&a, new_task_run(e1.id, "step"))
                        .await
                        .unwrap();
                    ledger
                        .set_task_run_state(&a, t.id, propose(StateType::Running))
                        .await
                        .unwrap();
                } else {
                    ledger.create_execution(&a, new_execution()).await.unwrap();
                }
            }
        })
    };
    let tenant = LogScope::Tenant("a".into());
    let execution = LogScope::Execution("a".into(), e1.id.to_string());
    let (mut tenant_at, mut exec_at, mut last_head) = (0, 0, 0);
    let mut exec_read = Vec::new();
    // (read up to, head): the scope had nothing in between.
    let mut quiet: Vec<(i64, i64)> = Vec::new();
    loop {
        let done = writer.is_finished();
        let page = b
            .store
            .events_after(&tenant, tenant_at, 5, usize::MAX)
            .await
            .unwrap();
        assert!(page.head >= last_head, "the head never goes back");
        last_head = page.head;
        let want: Vec<i64> = (tenant_at + 1..=tenant_at + page.events.len() as i64).collect();
        assert_eq!(seqs(&page.events), want, "a tenant's log has no gaps");
        assert!(page.events.iter().all(|e| e.seq <= page.head));
        tenant_at += page.events.len() as i64;
        if !page.full {
            assert_eq!(
                tenant_at, page.head,
                "a page short of its bounds reaches the head"
            );
        }

        let page: LogPage = b
            .store
            .events_after(&execution, exec_at, 3, usize::MAX)
            .await
            .unwrap();
        assert!(
            page.events
                .iter()
                .all(|e| e.seq <= page.head && e.seq > exec_at)
        );
        if let Some(last) = page.events.last() {
            exec_at = last.seq;
        }
        if !page.full {
            quiet.push((exec_at, page.head));
        }
        exec_read.extend(page.events);
        if done && tenant_at == b.store.head("a").await.unwrap() {
            // One more read of the execution's scope after the last write.
            let rest = events(&b.store, &execution, exec_at).await;
            exec_read.extend(rest);
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    let all = events(&b.store, &execution, 0).await;
    assert_eq!(
        seqs(&exec_read),
        seqs(&all),
        "each event read once, in order"
    );
    for (from, head) in quiet {
        assert!(
            all.iter().all(|e| e.seq <= from || e.seq > head),
            "the scope had an event in ({from}, {head}] that a page short of its bounds missed"
        );
    }
}

/// The same request_id sent many times at once creates one execution and
/// answers each with it; a different request under that id is refused.
pub(crate) async fn a_repeated_request_id_finds_the_one_execution(b: Backend) {
    let a = caller("a");
    let mut new = new_execution();
    new.request_id = Some("req-1".into());
    new.metadata = strings(&[("k", "v")]);
    let calls = (0..20).map(|_| b.ledger.create_execution(&a, new.clone()));
    let answers: Vec<(Execution, bool)> = futures::future::try_join_all(calls).await.unwrap();
    let first = &answers[0].0;
    assert!(answers.iter().all(|(e, _)| e.id == first.id));
    assert_eq!(answers.iter().filter(|(_, created)| *created).count(), 1);
    assert_eq!(b.store.head("a").await.unwrap(), 1, "one CREATED event");
    let listed = list_executions(&b.store, "a", ExecutionFilter::default()).await;
    assert_eq!(listed, [first.id.to_string()]);

    // Later, and under another tenant: the same answer, and a new one.
    let (again, created) = b.ledger.create_execution(&a, new.clone()).await.unwrap();
    assert_eq!((again.id, created), (first.id, false));
    let (theirs, created) = b
        .ledger
        .create_execution(&caller("b"), new.clone())
        .await
        .unwrap();
    assert!(
        created && theirs.id != first.id,
        "request ids are per tenant"
    );

    // Repeats of the stored request among other creations at once: still
    // the one execution, and the log stays dense under the others.
    let mixed = (0..20).map(|i| {
        let request = if i % 2 == 0 {
            new.clone()
        } else {
            new_execution()
        };
        b.ledger.create_execution(&a, request)
    });
    let answers: Vec<(Execution, bool)> = futures::future::try_join_all(mixed).await.unwrap();
    for (i, (e, created)) in answers.iter().enumerate() {
        assert_eq!((e.id == first.id, *created), (i % 2 == 0, i % 2 == 1));
    }
    let log = events(&b.store, &LogScope::Tenant("a".into()), 0).await;
    assert_eq!(seqs(&log), (1..=11).collect::<Vec<_>>());
    for e in &log {
        let id = ExecutionId::parse(&e.execution_id).unwrap();
        let (stored, seq) = b.store.execution("a", id).await.unwrap().unwrap();
        assert_eq!((seq, &stored), (e.seq, &recorded_execution(e)));
    }
    assert_eq!(b.heard.seqs_of("a"), (1..=11).collect::<Vec<_>>());

    let mut different = new.clone();
    different.goal = Some("something else".into());
    let refused = (0..5).map(|_| b.ledger.create_execution(&a, different.clone()));
    for r in futures::future::join_all(refused).await {
        assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    }
    assert_eq!(b.store.head("a").await.unwrap(), 11);
}

/// The same task run key sent many times at once creates one run; runs
/// without a dynamic key take distinct, dense indexes.
pub(crate) async fn a_repeated_task_run_key_finds_the_one_run(b: Backend) {
    let a = caller("a");
    let (e, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    let mut keyed = new_task_run(e.id, "fetch");
    keyed.dynamic_key = Some("page-1".into());
    let calls = (0..20).map(|_| b.ledger.create_task_run(&a, keyed.clone()));
    let answers: Vec<(TaskRun, bool)> = futures::future::try_join_all(calls).await.unwrap();
    let first = &answers[0].0;
    assert!(answers.iter().all(|(t, _)| t.id == first.id));
    assert_eq!(answers.iter().filter(|(_, created)| *created).count(), 1);
    assert_eq!(b.store.head("a").await.unwrap(), 2);

    // Repeats of the stored key among other creations at once.
    let mixed = (0..20).map(|i| {
        let request = if i % 2 == 0 {
            keyed.clone()
        } else {
            new_task_run(e.id, "other")
        };
        b.ledger.create_task_run(&a, request)
    });
    let answers: Vec<(TaskRun, bool)> = futures::future::try_join_all(mixed).await.unwrap();
    for (i, (t, created)) in answers.iter().enumerate() {
        assert_eq!((t.id == first.id, *created), (i % 2 == 0, i % 2 == 1));
    }
    let log = events(&b.store, &LogScope::Tenant("a".into()), 0).await;
    assert_eq!(seqs(&log), (1..=12).collect::<Vec<_>>());
    for ev in &log[1..] {
        let id = TaskRunId::parse(ev.task_run_id.as_deref().unwrap()).unwrap();
        let (stored, seq) = b.store.task_run("a", id).await.unwrap().unwrap();
        assert_eq!((seq, &stored), (ev.seq, &recorded_task_run(ev)));
    }

    let calls = (0..20).map(|_| b.ledger.create_task_run(&a, new_task_run(e.id, "parse")));
    let answers: Vec<(TaskRun, bool)> = futures::future::try_join_all(calls).await.unwrap();
    let mut keys: Vec<i64> = answers
        .iter()
        .map(|(t, _)| t.dynamic_key.parse().unwrap())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, (0..20).collect::<Vec<_>>());
    assert!(answers.iter().all(|(_, created)| *created));
    let filter = TaskRunFilter {
        execution_id: Some(e.id),
        ..TaskRunFilter::default()
    };
    assert_eq!(list_task_runs(&b.store, "a", filter).await.len(), 31);
    assert_eq!(b.store.head("a").await.unwrap(), 32);
}

/// A transition_id sent again (at once, or later with another proposal)
/// gets the first result and changes nothing.
pub(crate) async fn a_repeated_transition_id_gets_the_first_result(b: Backend) {
    let a = caller("a");
    let (e, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    let running = with_transition_id(propose(StateType::Running), "start");
    let calls = (0..10).map(|_| b.ledger.set_execution_state(&a, e.id, running.clone()));
    let answers: Vec<SetStateOutcome<Execution>> =
        futures::future::try_join_all(calls).await.unwrap();
    assert_eq!(answers.iter().filter(|o| o.changed).count(), 1);
    let first = answers.iter().find(|o| o.changed).unwrap();
    for o in &answers {
        assert_eq!((o.status, &o.state), (Status::Accept, &first.state));
    }
    let other = with_transition_id(propose(StateType::Completed), "start");
    let replay = b.ledger.set_execution_state(&a, e.id, other).await.unwrap();
    assert_eq!(
        (replay.status, &replay.state, replay.changed),
        (Status::Accept, &first.state, false)
    );
    let (now, _) = b.store.execution("a", e.id).await.unwrap().unwrap();
    assert_eq!(now.run.state, first.state);
    assert_eq!(b.store.head("a").await.unwrap(), 2);

    // A task run's, and one refused first: the refusal is not recorded.
    let (t, _) = b
        .ledger
        .create_task_run(&a, new_task_run(e.id, "k"))
        .await
        .unwrap();
    let done = with_transition_id(propose(StateType::Completed), "finish");
    let first = b
        .ledger
        .set_task_run_state(&a, t.id, done.clone())
        .await
        .unwrap();
    assert!(first.changed);
    let calls = (0..10).map(|_| b.ledger.set_task_run_state(&a, t.id, done.clone()));
    for o in futures::future::try_join_all(calls).await.unwrap() {
        assert_eq!(
            (o.status, &o.state, o.changed),
            (Status::Accept, &first.state, false)
        );
    }
    let same = with_transition_id(propose(StateType::Completed), "again");
    let refused = b
        .ledger
        .set_task_run_state(&a, t.id, same.clone())
        .await
        .unwrap();
    assert_eq!((refused.status, refused.changed), (Status::Abort, false));
    let forced = Proposal {
        force: true,
        ..with_transition_id(propose(StateType::Running), "again")
    };
    let taken = b.ledger.set_task_run_state(&a, t.id, forced).await.unwrap();
    assert_eq!((taken.status, taken.changed), (Status::Accept, true));
    // Transition ids are per run.
    let (u, _) = b
        .ledger
        .create_task_run(&a, new_task_run(e.id, "k"))
        .await
        .unwrap();
    let own = b.ledger.set_task_run_state(&a, u.id, done).await.unwrap();
    assert!(own.changed && own.state.id != first.state.id);
}

/// A snapshot of an execution holds its task runs in the order of their
/// latest events, each with that event's sequence, and the head; the next
/// pages follow from the last one's sequence up to that head only.
pub(crate) async fn snapshots_hold_task_runs_by_their_latest_event(b: Backend) {
    let a = caller("a");
    let (e, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    b.ledger
        .set_execution_state(&a, e.id, propose(StateType::Running))
        .await
        .unwrap();
    let n = SNAPSHOT_PAGE as usize + 20;
    let calls = (0..n).map(|i| {
        b.ledger
            .create_task_run(&a, new_task_run(e.id, &format!("k{i}")))
    });
    let created: Vec<TaskRun> = futures::future::try_join_all(calls)
        .await
        .unwrap()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    // The first created moves to the end of the order.
    let moved = b
        .ledger
        .set_task_run_state(&a, created[0].id, propose(StateType::Running))
        .await
        .unwrap()
        .run;
    b.ledger
        .create_execution(&caller("b"), new_execution())
        .await
        .unwrap();

    let snap = b.store.execution_snapshot("a", e.id, true).await.unwrap();
    let head = b.store.head("a").await.unwrap();
    assert_eq!(snap.head, head);
    let (x, x_seq) = snap.execution.clone().unwrap();
    assert_eq!((x.id, x_seq), (e.id, 2));
    let log = events(
        &b.store,
        &LogScope::Execution("a".into(), e.id.to_string()),
        0,
    )
    .await;
    let mut latest: HashMap<String, i64> = HashMap::new();
    for ev in &log {
        latest.insert(run_of(ev).to_owned(), ev.seq);
    }
    let mut order: Vec<(i64, String)> = created
        .iter()
        .map(|t| (latest[&t.id.to_string()], t.id.to_string()))
        .collect();
    order.sort();
    assert_eq!(order.last().unwrap().1, moved.id.to_string());

    // Page by page: in order, each once, each as stored at its sequence.
    let mut page = snap.task_runs;
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(!page.runs.is_empty() && page.runs.len() <= SNAPSHOT_PAGE as usize);
        for (t, seq) in &page.runs {
            assert_eq!(latest[&t.id.to_string()], *seq);
            let (stored, stored_seq) = b.store.task_run("a", t.id).await.unwrap().unwrap();
            assert_eq!((&stored, stored_seq), (t, *seq));
            seen.push((*seq, t.id.to_string()));
        }
        let Some(next) = page.next else { break };
        assert_eq!(
            next,
            seen.last().unwrap().0,
            "the next page starts after the last run"
        );
        page = b
            .store
            .task_runs_after("a", e.id, next, snap.head)
            .await
            .unwrap();
    }
    assert!(pages >= 2);
    assert_eq!(seen, order);

    // After the snapshot: a run that changes leaves the snapshot's later
    // pages (its own later events show it), and a new run is not in them.
    let snap = b.store.execution_snapshot("a", e.id, true).await.unwrap();
    let after_first = snap.task_runs.next.unwrap();
    let later = TaskRunId::parse(&seen[seen.len() - 5].1).unwrap();
    b.ledger
        .set_task_run_state(&a, later, propose(StateType::Running))
        .await
        .unwrap();
    let (new, _) = b
        .ledger
        .create_task_run(&a, new_task_run(e.id, "new"))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let mut next = Some(after_first);
    while let Some(after) = next {
        let page = b
            .store
            .task_runs_after("a", e.id, after, snap.head)
            .await
            .unwrap();
        assert!(
            page.runs
                .iter()
                .all(|(_, seq)| *seq > after && *seq <= snap.head)
        );
        rest.extend(page.runs.iter().map(|(t, _)| t.id.to_string()));
        next = page.next;
    }
    let expected: Vec<String> = seen
        .iter()
        .filter(|(seq, id)| *seq > after_first && *id != later.to_string())
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(rest, expected);
    assert!(!rest.contains(&new.id.to_string()));

    // Without task runs, for a missing execution, and for one task run.
    let bare = b.store.execution_snapshot("a", e.id, false).await.unwrap();
    assert!(bare.execution.is_some() && bare.task_runs.runs.is_empty());
    assert!(bare.task_runs.next.is_none());
    let missing = b
        .store
        .execution_snapshot("a", ExecutionId::new(), true)
        .await
        .unwrap();
    assert!(missing.execution.is_none() && missing.task_runs.runs.is_empty());
    assert_eq!(missing.head, b.store.head("a").await.unwrap());
    let theirs = b.store.execution_snapshot("b", e.id, true).await.unwrap();
    assert!(theirs.execution.is_none(), "another tenant's execution");
    let (run, head) = b.store.task_run_snapshot("a", later).await.unwrap();
    let (run, seq) = run.unwrap();
    assert_eq!(run.run.state.state_type, StateType::Running);
    assert_eq!(head, b.store.head("a").await.unwrap());
    assert!(seq <= head);
    assert_eq!(b.store.task_run_snapshot("b", later).await.unwrap().0, None);

    // A page stops at its byte bound too: large runs come a few at a time.
    let (big, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    for i in 0..5 {
        let mut new = new_task_run(big.id, &format!("big{i}"));
        new.input = json!({ "blob": "x".repeat(40 * 1024) });
        b.ledger.create_task_run(&a, new).await.unwrap();
    }
    let snap = b.store.execution_snapshot("a", big.id, true).await.unwrap();
    let mut count = snap.task_runs.runs.len();
    assert!(count < 5, "{count} runs of 40 KiB in one page");
    let mut next = snap.task_runs.next;
    while let Some(after) = next {
        let page = b
            .store
            .task_runs_after("a", big.id, after, snap.head)
            .await
            .unwrap();
        count += page.runs.len();
        next = page.next;
    }
    assert_eq!(count, 5);
}

/// A snapshot taken while an execution's task runs change reflects the log
/// exactly up to its head: each run as of its latest event up to there.
pub(crate) async fn snapshots_reflect_exactly_their_head(b: Backend) {
    let a = caller("a");
    let (e, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    b.ledger
        .set_execution_state(&a, e.id, propose(StateType::Running))
        .await
        .unwrap();
    let writer = {
        let ledger = b.ledger.clone();
        tokio::spawn(async move {
            let a = caller("a");
            for i in 0..20 {
                let (t, _) = ledger
                    .create_task_run(&a, new_task_run(e.id, &format!("k{i}")))
                    .await
                    .unwrap();
                ledger
                    .set_task_run_state(&a, t.id, propose(StateType::Running))
                    .await
                    .unwrap();
                ledger
                    .set_task_run_state(
                        &a,
                        t.id,
                        with_output(propose(StateType::Completed), json!(i)),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut snaps = Vec::new();
    while !writer.is_finished() {
        snaps.push(b.store.execution_snapshot("a", e.id, true).await.unwrap());
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    snaps.push(b.store.execution_snapshot("a", e.id, true).await.unwrap());
    let log = events(
        &b.store,
        &LogScope::Execution("a".into(), e.id.to_string()),
        0,
    )
    .await;
    for snap in &snaps {
        let upto: Vec<&StoredEvent> = log.iter().filter(|ev| ev.seq <= snap.head).collect();
        let mut latest: Vec<&StoredEvent> = Vec::new();
        for ev in &upto {
            latest.retain(|l| run_of(l) != run_of(ev));
            latest.push(ev);
        }
        let (x, seq) = snap.execution.as_ref().unwrap();
        let own = latest.iter().find(|ev| ev.task_run_id.is_none()).unwrap();
        assert_eq!((x, *seq), (&recorded_execution(own), own.seq));
        let expected: Vec<(TaskRun, i64)> = latest
            .iter()
            .filter(|ev| ev.task_run_id.is_some())
            .map(|ev| (recorded_task_run(ev), ev.seq))
            .collect();
        assert_eq!(
            snap.task_runs.runs, expected,
            "the snapshot at head {} shows each run as of its latest event up to there",
            snap.head
        );
    }
}

/// Execution lists: each filter, newest first, never another tenant's.
pub(crate) async fn execution_lists_filter_and_go_newest_first(b: Backend) {
    let a = caller("a");
    let l = &b.ledger;
    let make = |task_id: Option<&str>, metadata: &[(&str, &str)]| {
        let mut new = new_execution();
        new.task_id = task_id.map(str::to_owned);
        new.metadata = strings(metadata);
        new
    };
    let mut made = Vec::new();
    for new in [
        make(Some("alpha"), &[("team", "a"), ("env", "prod")]),
        make(Some("beta"), &[("team", "b")]),
        make(Some("alpha"), &[("team", "a"), ("env", "dev")]),
        make(None, &[("team", "ü🌍"), ("env", "prod")]),
        make(Some("alpha"), &[("team", "a")]),
        make(Some("beta"), &[]),
    ] {
        made.push(l.create_execution(&a, new).await.unwrap().0);
        tick().await;
    }
    let id = |i: usize| made[i].id.to_string();
    l.set_execution_state(&a, made[2].id, propose(StateType::Running))
        .await
        .unwrap();
    l.delete_execution(&a, made[4].id).await.unwrap();
    l.set_execution_state(&a, made[5].id, propose(StateType::Running))
        .await
        .unwrap();
    l.set_execution_state(&a, made[5].id, propose(StateType::Completed))
        .await
        .unwrap();
    l.create_execution(&caller("b"), make(Some("alpha"), &[("team", "a")]))
        .await
        .unwrap();

    let list = |filter: ExecutionFilter| list_executions(&b.store, "a", filter);
    let ids = |is: &[usize]| is.iter().map(|i| id(*i)).collect::<Vec<_>>();
    let kept: Vec<Execution> = made
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 4)
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(list(ExecutionFilter::default()).await, newest_first(&kept));
    assert_eq!(
        list(ExecutionFilter::default()).await,
        ids(&[5, 3, 2, 1, 0])
    );
    let all = ExecutionFilter {
        show_deleted: true,
        ..ExecutionFilter::default()
    };
    assert_eq!(list(all.clone()).await, ids(&[5, 4, 3, 2, 1, 0]));
    let alpha = ExecutionFilter {
        task_id: Some("alpha".into()),
        ..ExecutionFilter::default()
    };
    assert_eq!(list(alpha.clone()).await, ids(&[2, 0]));
    assert_eq!(
        list(ExecutionFilter {
            show_deleted: true,
            ..alpha
        })
        .await,
        ids(&[4, 2, 0])
    );
    let types = |t: &[StateType]| ExecutionFilter {
        state_types: t.to_vec(),
        ..ExecutionFilter::default()
    };
    assert_eq!(list(types(&[StateType::Running])).await, ids(&[2]));
    assert_eq!(
        list(types(&[StateType::Completed, StateType::Running])).await,
        ids(&[5, 2])
    );
    assert_eq!(list(types(&[StateType::Pending])).await, ids(&[3, 1, 0]));
    assert!(list(types(&[StateType::Failed])).await.is_empty());
    let meta = |pairs: &[(&str, &str)]| ExecutionFilter {
        metadata: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..ExecutionFilter::default()
    };
    assert_eq!(list(meta(&[("team", "a")])).await, ids(&[2, 0]));
    assert_eq!(
        list(meta(&[("team", "a"), ("env", "prod")])).await,
        ids(&[0])
    );
    assert_eq!(list(meta(&[("env", "prod")])).await, ids(&[3, 0]));
    assert_eq!(list(meta(&[("team", "ü🌍")])).await, ids(&[3]));
    assert!(list(meta(&[("env", "staging")])).await.is_empty());
    assert!(
        list(meta(&[("team", "A")])).await.is_empty(),
        "values match exactly"
    );
    assert!(
        list(meta(&[("Team", "a")])).await.is_empty(),
        "keys match exactly"
    );
    assert!(list(meta(&[("a", "team")])).await.is_empty());
    let at = |i: usize| Some(made[i].run.created_at);
    let after = ExecutionFilter {
        created_after: at(1),
        ..ExecutionFilter::default()
    };
    assert_eq!(
        list(after.clone()).await,
        ids(&[5, 3, 2]),
        "after is exclusive"
    );
    let before = ExecutionFilter {
        created_before: at(3),
        ..ExecutionFilter::default()
    };
    assert_eq!(list(before).await, ids(&[2, 1, 0]), "before is exclusive");
    let between = ExecutionFilter {
        created_before: at(3),
        ..after
    };
    assert_eq!(list(between).await, ids(&[2]));
    let combined = ExecutionFilter {
        task_id: Some("alpha".into()),
        state_types: vec![StateType::Pending],
        metadata: vec![("team".into(), "a".into())],
        show_deleted: true,
        ..ExecutionFilter::default()
    };
    assert_eq!(list(combined).await, ids(&[4, 0]));
    assert_eq!(list_executions(&b.store, "b", all).await.len(), 1);
    assert!(
        list_executions(&b.store, "c", ExecutionFilter::default())
            .await
            .is_empty()
    );
}

/// Task run lists: each filter, newest first, never another tenant's.
pub(crate) async fn task_run_lists_filter_and_go_newest_first(b: Backend) {
    let a = caller("a");
    let l = &b.ledger;
    let (e, _) = l.create_execution(&a, new_execution()).await.unwrap();
    let (f, _) = l.create_execution(&a, new_execution()).await.unwrap();
    for x in [e.id, f.id] {
        l.set_execution_state(&a, x, propose(StateType::Running))
            .await
            .unwrap();
    }
    let make = |x: ExecutionId, key: &str, labels: &[(&str, &str)]| {
        let mut new = new_task_run(x, key);
        new.labels = strings(labels);
        new
    };
    let mut made = Vec::new();
    for new in [
        make(e.id, "fetch", &[("kind", "io"), ("lang", "en")]),
        make(e.id, "parse", &[("kind", "cpu")]),
        make(e.id, "fetch", &[("kind", "io")]),
        make(f.id, "fetch", &[("kind", "io"), ("lang", "日本語")]),
        make(e.id, "store", &[]),
    ] {
        made.push(l.create_task_run(&a, new).await.unwrap().0);
        tick().await;
    }
    let id = |i: usize| made[i].id.to_string();
    let ids = |is: &[usize]| is.iter().map(|i| id(*i)).collect::<Vec<_>>();
    for i in [0, 1] {
        l.set_task_run_state(&a, made[i].id, propose(StateType::Running))
            .await
            .unwrap();
    }
    l.set_task_run_state(&a, made[0].id, propose(StateType::Completed))
        .await
        .unwrap();
    l.set_task_run_state(&a, made[1].id, propose(StateType::Failed))
        .await
        .unwrap();
    l.mark_task_run_stale(&a, made[0].id).await.unwrap();
    l.delete_task_run(&a, made[2].id).await.unwrap();
    let (theirs, _) = l
        .create_execution(&caller("b"), new_execution())
        .await
        .unwrap();
    l.create_task_run(&caller("b"), make(theirs.id, "fetch", &[("kind", "io")]))
        .await
        .unwrap();

    let list = |filter: TaskRunFilter| list_task_runs(&b.store, "a", filter);
    let none = TaskRunFilter::default;
    assert_eq!(list(none()).await, ids(&[4, 3, 1, 0]));
    let deleted_too = TaskRunFilter {
        show_deleted: true,
        ..none()
    };
    assert_eq!(list(deleted_too.clone()).await, ids(&[4, 3, 2, 1, 0]));
    let of_e = TaskRunFilter {
        execution_id: Some(e.id),
        ..none()
    };
    assert_eq!(list(of_e.clone()).await, ids(&[4, 1, 0]));
    let fetch = TaskRunFilter {
        task_key: Some("fetch".into()),
        ..none()
    };
    assert_eq!(list(fetch.clone()).await, ids(&[3, 0]));
    assert_eq!(
        list(TaskRunFilter {
            show_deleted: true,
            execution_id: Some(e.id),
            ..fetch
        })
        .await,
        ids(&[2, 0])
    );
    let types = |t: &[StateType]| TaskRunFilter {
        state_types: t.to_vec(),
        ..none()
    };
    assert_eq!(list(types(&[StateType::Pending])).await, ids(&[4, 3]));
    assert_eq!(
        list(types(&[StateType::Completed, StateType::Failed])).await,
        ids(&[1, 0])
    );
    let labels = |pairs: &[(&str, &str)]| TaskRunFilter {
        labels: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..none()
    };
    assert_eq!(list(labels(&[("kind", "io")])).await, ids(&[3, 0]));
    assert_eq!(
        list(labels(&[("kind", "io"), ("lang", "en")])).await,
        ids(&[0])
    );
    assert_eq!(list(labels(&[("lang", "日本語")])).await, ids(&[3]));
    assert!(list(labels(&[("kind", "gpu")])).await.is_empty());
    let stale = |s: bool| TaskRunFilter {
        stale: Some(s),
        ..none()
    };
    assert_eq!(list(stale(true)).await, ids(&[0]));
    assert_eq!(list(stale(false)).await, ids(&[4, 3, 1]));
    let at = |i: usize| Some(made[i].run.created_at);
    assert_eq!(
        list(TaskRunFilter {
            created_after: at(1),
            ..none()
        })
        .await,
        ids(&[4, 3])
    );
    assert_eq!(
        list(TaskRunFilter {
            created_before: at(3),
            show_deleted: true,
            ..none()
        })
        .await,
        ids(&[2, 1, 0])
    );
    assert_eq!(
        list(TaskRunFilter {
            created_after: at(0),
            created_before: at(4),
            ..of_e
        })
        .await,
        ids(&[1])
    );
    assert_eq!(list_task_runs(&b.store, "b", deleted_too).await.len(), 1);
}

/// Pages follow one another exactly (no run twice, none skipped) while new
/// runs are created between them; the new ones are not in later pages.
pub(crate) async fn list_pages_stay_exact_while_rows_are_inserted(b: Backend) {
    let a = caller("a");
    // Made a few at once, so that some may share a creation time: the id
    // orders those.
    let mut made = Vec::new();
    for _ in 0..3 {
        let calls = (0..4).map(|_| b.ledger.create_execution(&a, new_execution()));
        made.extend(
            futures::future::try_join_all(calls)
                .await
                .unwrap()
                .into_iter()
                .map(|(e, _)| e),
        );
        tick().await;
    }
    // And several at the very same instant.
    made.extend(executions_created_at(&b.store, "a", Timestamp::now(), 7).await);
    let expected = newest_first(&made);
    let filter = ExecutionFilter::default();
    let mut seen = Vec::new();
    let mut after = None;
    let mut inserted = Vec::new();
    loop {
        let (runs, next) = b
            .store
            .list_executions("a", &filter, &Page { size: 5, after })
            .await
            .unwrap();
        assert!(runs.len() <= 5);
        seen.extend(exec_ids(&runs));
        for _ in 0..3 {
            inserted.push(
                b.ledger
                    .create_execution(&a, new_execution())
                    .await
                    .unwrap()
                    .0,
            );
        }
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    // A fresh listing has the new ones first.
    let mut everything = made.clone();
    everything.extend(inserted);
    assert_eq!(
        list_executions(&b.store, "a", filter).await,
        newest_first(&everything)
    );

    // The same for task runs.
    let (e, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let calls = (0..3).map(|_| b.ledger.create_task_run(&a, new_task_run(e.id, "k")));
        runs.extend(
            futures::future::try_join_all(calls)
                .await
                .unwrap()
                .into_iter()
                .map(|(t, _)| t),
        );
        tick().await;
    }
    runs.extend(task_runs_created_at(&b.store, "a", e.id, Timestamp::now(), 5).await);
    let filter = TaskRunFilter {
        execution_id: Some(e.id),
        ..TaskRunFilter::default()
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = b
            .store
            .list_task_runs("a", &filter, &Page { size: 4, after })
            .await
            .unwrap();
        seen.extend(task_run_ids(&page));
        b.ledger
            .create_task_run(&a, new_task_run(e.id, "k"))
            .await
            .unwrap();
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    runs.sort_by(|x, y| {
        (y.run.created_at, y.id.to_string()).cmp(&(x.run.created_at, x.id.to_string()))
    });
    assert_eq!(seen, task_run_ids(&runs));
}

/// A page holds no more than one response may carry, however many rows
/// were asked for, and the pages together hold every row once.
pub(crate) async fn list_pages_are_bounded_by_bytes(b: Backend) {
    let a = caller("a");
    let mut made = Vec::new();
    for i in 0..6 {
        let mut new = new_execution();
        new.input = Map::from_iter([("blob".to_owned(), json!(format!("{i}").repeat(900_000)))]);
        made.push(b.ledger.create_execution(&a, new).await.unwrap().0);
    }
    let pages = list_all_executions(&b.store, "a", &ExecutionFilter::default(), 50).await;
    assert!(
        pages.len() >= 2,
        "six runs of 900 KB take more than one page"
    );
    for page in &pages {
        assert!(!page.is_empty());
        let bytes: usize = page.iter().map(document::execution_bytes).sum();
        assert!(bytes <= document::MAX_PAGE_BYTES, "a page of {bytes} bytes");
    }
    let listed: Vec<Execution> = pages.into_iter().flatten().collect();
    assert_eq!(exec_ids(&listed), newest_first(&made));
    for e in &listed {
        assert_eq!(made.iter().find(|m| m.id == e.id), Some(e));
    }
}

/// A run's history comes oldest first, page by page, exactly once even
/// while states are appended, and never with another run's states.
pub(crate) async fn history_pages_go_oldest_first(b: Backend) {
    let a = caller("a");
    let (e, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    let (other, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    let force = |name: &str| Proposal {
        force: true,
        state: StateProposal::of_type(StateType::Running).named(name),
        ..propose(StateType::Running)
    };
    let mut expected = vec![e.run.state.id];
    for i in 0..7 {
        let o = b
            .ledger
            .set_execution_state(&a, e.id, force(&format!("s{i}")))
            .await
            .unwrap();
        expected.push(o.state.id);
        b.ledger
            .set_execution_state(&a, other.id, force("other"))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = HistoryPage::new(3, &token).unwrap();
        let (states, next) = b.ledger.execution_states(&a, e.id, &page).await.unwrap();
        assert!(states.len() <= 3);
        seen.extend(states.iter().map(|s| s.id));
        // A state appended between pages comes on a later one.
        if seen.len() == 3 {
            let o = b
                .ledger
                .set_execution_state(&a, e.id, force("late"))
                .await
                .unwrap();
            expected.push(o.state.id);
        }
        match next {
            Some(t) => token = t,
            None => break,
        }
    }
    assert_eq!(seen, expected);
    let states = all_states(&b.store, "a", &e.id.to_string()).await;
    let (now, _) = b.store.execution("a", e.id).await.unwrap().unwrap();
    assert_eq!(states.last(), Some(&now.run.state));
    assert!(
        all_states(&b.store, "b", &e.id.to_string())
            .await
            .is_empty()
    );

    // A task run's too.
    let (t, _) = b
        .ledger
        .create_task_run(&a, new_task_run(other.id, "k"))
        .await
        .unwrap();
    let o = b
        .ledger
        .set_task_run_state(&a, t.id, propose(StateType::Running))
        .await
        .unwrap();
    let (states, next) = b
        .ledger
        .task_run_states(&a, t.id, &HistoryPage::new(1, "").unwrap())
        .await
        .unwrap();
    assert_eq!(states, std::slice::from_ref(&t.run.state));
    let page = HistoryPage::new(1, &next.unwrap()).unwrap();
    let (states, next) = b.ledger.task_run_states(&a, t.id, &page).await.unwrap();
    assert_eq!(states, [o.state]);
    if let Some(next) = next {
        let page = HistoryPage::new(1, &next).unwrap();
        let (states, next) = b.ledger.task_run_states(&a, t.id, &page).await.unwrap();
        assert!(states.is_empty() && next.is_none());
    }
}

/// Text every document field should keep exactly: non-ASCII, emoji,
/// quotes, backslashes and control characters. (NUL is refused by the API
/// in names, keys, metadata and labels, on every backend; values keep it,
/// see `awkward_value`.)
const AWKWARD: &str = "naïve — 名前 🌍 a\u{1}b \" \\ \n\t";

fn awkward_value() -> Value {
    json!({
        "text": AWKWARD,
        "nul": "\u{0}",
        "max": u64::MAX,
        "min": i64::MIN,
        "huge": 1e300,
        "tiny": 1e-300,
        "frac": 0.1,
        "beyond": 12_345_678_901_234_567_890_123_456_789.0_f64,
        "zero": 0,
        "nested": {"list": [1, [2, {"deep": [null, true, false, "x\u{0}"]}]], "empty": {}, "none": []},
        "k\u{0}ey": "value",
        "": "empty key",
    })
}

/// Documents come back exactly as they were written, from every read:
/// awkward text (NUL included), big numbers, nested values; lists filter on
/// awkward values too.
pub(crate) async fn documents_round_trip_exactly(b: Backend) {
    let a = caller("a");
    let l = &b.ledger;
    let Value::Object(input) = awkward_value() else {
        unreachable!()
    };
    let mut new = new_execution();
    new.name = AWKWARD.into();
    new.task_id = Some(format!("task {AWKWARD}"));
    new.goal = Some(AWKWARD.into());
    new.input = input;
    new.metadata = strings(&[("ctl", "x\u{1}y"), ("text", AWKWARD), ("k\u{7f}", "v")]);
    new.request_id = Some(format!("req {AWKWARD}"));
    new.config_overrides = ConfigOverrides {
        temperature: Some(0.3),
        max_tokens: Some(123),
        model: Some(AWKWARD.into()),
    };
    let mut initial = StateProposal::of_type(StateType::Running).named(AWKWARD);
    initial.message = AWKWARD.into();
    initial.data = Some(awkward_value());
    new.initial_state = Some(initial);
    let (e, _) = l.create_execution(&a, new.clone()).await.unwrap();
    let (again, created) = l.create_execution(&a, new).await.unwrap();
    assert_eq!(
        (&again, created),
        (&e, false),
        "found again by its awkward request_id"
    );

    let mut producer = new_task_run(e.id, "producer");
    producer.name = AWKWARD.into();
    producer.dynamic_key = Some(AWKWARD.into());
    producer.tags = vec![AWKWARD.into(), "🌍".into()];
    producer.labels = strings(&[("l", "\u{1}"), ("text", AWKWARD)]);
    producer.input = awkward_value();
    producer.cache_key = Some(AWKWARD.into());
    producer.task_version = Some(AWKWARD.into());
    producer.retry_policy = RetryPolicy {
        retries: 0,
        retry_delay_seconds: vec![0.1, 1e-3, 12.5],
        retry_jitter_factor: 0.25,
    };
    let (t, _) = l.create_task_run(&a, producer).await.unwrap();
    l.set_task_run_state(&a, t.id, propose(StateType::Running))
        .await
        .unwrap();
    let mut done = with_output(propose(StateType::Completed), awkward_value());
    done.state.message = AWKWARD.into();
    done.state.data = Some(awkward_value());
    let t = l.set_task_run_state(&a, t.id, done).await.unwrap().run;
    assert_eq!(t.run.output, Some(awkward_value()));

    // A consumer's template reads the producer's output from the store.
    let mut consumer = new_task_run(e.id, "consumer");
    consumer.input = json!({ "got": "{{producer.output}}", "max": "{{producer.output.max}}" });
    let (c, _) = l.create_task_run(&a, consumer).await.unwrap();
    let c = l
        .set_task_run_state(&a, c.id, propose(StateType::Running))
        .await
        .unwrap()
        .run;
    assert_eq!(
        c.resolved_input,
        Some(json!({ "got": awkward_value(), "max": u64::MAX }))
    );
    assert_eq!(c.task_inputs, [t.id]);

    // A failure's error.
    let (f, _) = l
        .create_task_run(&a, new_task_run(e.id, "failing"))
        .await
        .unwrap();
    let mut failed = propose(StateType::Failed);
    failed.payload.error = Some(ErrorInfo {
        message: AWKWARD.into(),
        error_type: AWKWARD.into(),
        traceback: AWKWARD.repeat(3),
    });
    let f = l.set_task_run_state(&a, f.id, failed).await.unwrap().run;
    assert_eq!(f.run.error.as_ref().unwrap().message, AWKWARD);

    // Every read returns them exactly.
    let (read, _) = b.store.execution("a", e.id).await.unwrap().unwrap();
    assert_eq!(read, e);
    for run in [&t, &c, &f] {
        let (read, _) = b.store.task_run("a", run.id).await.unwrap().unwrap();
        assert_eq!(&read, run);
        let (read, _) = b.store.task_run_snapshot("a", run.id).await.unwrap();
        assert_eq!(&read.unwrap().0, run);
        let log = events(
            &b.store,
            &LogScope::TaskRun("a".into(), run.id.to_string()),
            0,
        )
        .await;
        assert_eq!(&recorded_task_run(log.last().unwrap()), run);
        let states = all_states(&b.store, "a", &run.id.to_string()).await;
        assert_eq!(states.last(), Some(&run.run.state));
    }
    let snap = b.store.execution_snapshot("a", e.id, true).await.unwrap();
    assert_eq!(snap.execution.unwrap().0, e);
    let mut in_snapshot: Vec<TaskRun> = snap.task_runs.runs.into_iter().map(|(r, _)| r).collect();
    in_snapshot.sort_by_key(|r| r.id);
    assert_eq!(in_snapshot, [t.clone(), c.clone(), f.clone()]);
    let own = events(
        &b.store,
        &LogScope::ExecutionOnly("a".into(), e.id.to_string()),
        0,
    )
    .await;
    assert_eq!(recorded_execution(&own[0]), e);
    assert_eq!(record(&own[0]).task_id, e.task_id);
    assert_eq!(
        all_states(&b.store, "a", &e.id.to_string()).await,
        std::slice::from_ref(&e.run.state)
    );
    for pairs in [
        vec![("ctl".to_owned(), "x\u{1}y".to_owned())],
        vec![("text".to_owned(), AWKWARD.to_owned())],
        vec![("k\u{7f}".to_owned(), "v".to_owned())],
    ] {
        let filter = ExecutionFilter {
            task_id: e.task_id.clone(),
            metadata: pairs.clone(),
            ..ExecutionFilter::default()
        };
        let (listed, _) = b
            .store
            .list_executions(
                "a",
                &filter,
                &Page {
                    size: 10,
                    after: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(listed, std::slice::from_ref(&e), "filtered on {pairs:?}");
    }
    let near = ExecutionFilter {
        metadata: vec![("ctl".into(), "x".into())],
        ..ExecutionFilter::default()
    };
    assert!(
        list_executions(&b.store, "a", near).await.is_empty(),
        "no match on a prefix"
    );
    let filter = TaskRunFilter {
        task_key: Some("producer".into()),
        labels: vec![
            ("l".into(), "\u{1}".into()),
            ("text".into(), AWKWARD.into()),
        ],
        ..TaskRunFilter::default()
    };
    let (listed, _) = b
        .store
        .list_task_runs(
            "a",
            &filter,
            &Page {
                size: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(listed, std::slice::from_ref(&t));
    let empty = TaskRunFilter {
        labels: vec![("l".into(), String::new())],
        ..TaskRunFilter::default()
    };
    assert!(list_task_runs(&b.store, "a", empty).await.is_empty());
    // The producer's key finds it again.
    let mut same = new_task_run(e.id, "producer");
    same.dynamic_key = Some(AWKWARD.into());
    let (found, created) = l.create_task_run(&a, same).await.unwrap();
    assert_eq!((found.id, created), (t.id, false));
    // And its cached result, with the awkward key, completes another run.
    let mut cached = new_task_run(e.id, "again");
    cached.cache_key = Some(AWKWARD.into());
    let (r, _) = l.create_task_run(&a, cached).await.unwrap();
    let hit = l
        .set_task_run_state(&a, r.id, propose(StateType::Running))
        .await
        .unwrap();
    assert_eq!(hit.state.name, CACHED);
    assert_eq!(hit.run.run.output, Some(awkward_value()));
}

/// Retention removes each tenant's events from before the cutoff and
/// raises that tenant's compaction mark; a finished run whose last event
/// goes keeps only its current state and forgets its transition ids, while
/// a FAILED one (which may be retried) keeps both; expired cache entries go.
pub(crate) async fn retention_prunes_each_tenant_and_keeps_what_may_be_retried(b: Backend) {
    let (a, other) = (caller("a"), caller("b"));
    let l = &b.ledger;
    let step = |t: StateType, tid: &str| with_transition_id(propose(t), tid);
    // Finished: COMPLETED.
    let (done, _) = l.create_execution(&a, new_execution()).await.unwrap();
    l.set_execution_state(&a, done.id, step(StateType::Running, "d1"))
        .await
        .unwrap();
    l.set_execution_state(&a, done.id, step(StateType::Completed, "d2"))
        .await
        .unwrap();
    // FAILED: kept.
    let (failed, _) = l.create_execution(&a, new_execution()).await.unwrap();
    l.set_execution_state(&a, failed.id, step(StateType::Running, "f1"))
        .await
        .unwrap();
    l.set_execution_state(&a, failed.id, step(StateType::Failed, "f2"))
        .await
        .unwrap();
    // Still running, with task runs that complete into the cache: one entry
    // that expires, one that does not.
    let (busy, _) = l.create_execution(&a, new_execution()).await.unwrap();
    l.set_execution_state(&a, busy.id, propose(StateType::Running))
        .await
        .unwrap();
    let mut cached = Vec::new();
    for (key, expiration) in [
        ("expiring", Some(in_(Duration::from_millis(100)))),
        ("kept", None),
    ] {
        let mut new = new_task_run(busy.id, key);
        new.cache_key = Some(key.into());
        new.cache_expiration = expiration;
        let (t, _) = l.create_task_run(&a, new).await.unwrap();
        l.set_task_run_state(&a, t.id, propose(StateType::Running))
            .await
            .unwrap();
        l.set_task_run_state(
            &a,
            t.id,
            with_output(propose(StateType::Completed), json!(key)),
        )
        .await
        .unwrap();
        cached.push(t);
    }
    // Completed before the cutoff, deleted after it: its last event stays.
    let (late, _) = l.create_execution(&a, new_execution()).await.unwrap();
    l.set_execution_state(&a, late.id, propose(StateType::Running))
        .await
        .unwrap();
    l.set_execution_state(&a, late.id, propose(StateType::Completed))
        .await
        .unwrap();
    let (b1, _) = l.create_execution(&other, new_execution()).await.unwrap();
    l.set_execution_state(&other, b1.id, propose(StateType::Running))
        .await
        .unwrap();
    // A tenant whose whole log is old.
    let (d1, _) = l
        .create_execution(&caller("d"), new_execution())
        .await
        .unwrap();
    l.set_execution_state(&caller("d"), d1.id, propose(StateType::Running))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let old_a = b.store.head("a").await.unwrap();
    let old_b = b.store.head("b").await.unwrap();
    let cutoff = Timestamp::now();
    tick().await;
    l.delete_execution(&a, late.id).await.unwrap();
    l.create_execution(&a, new_execution()).await.unwrap();
    l.set_execution_state(&other, b1.id, propose(StateType::Completed))
        .await
        .unwrap();
    let (untouched, _) = l
        .create_execution(&caller("c"), new_execution())
        .await
        .unwrap();

    // Before: a transition id of the finished run is answered from its
    // first result.
    let replay = l
        .set_execution_state(&a, done.id, step(StateType::Completed, "d2"))
        .await
        .unwrap();
    assert_eq!((replay.status, replay.changed), (Status::Accept, false));
    let history = |run: String| {
        let store = b.store.clone();
        async move { all_states(&store, "a", &run).await }
    };
    let before: HashMap<String, Vec<State>> = {
        let mut m = HashMap::new();
        for run in [
            done.id.to_string(),
            failed.id.to_string(),
            busy.id.to_string(),
            late.id.to_string(),
            cached[0].id.to_string(),
            cached[1].id.to_string(),
        ] {
            m.insert(run.clone(), history(run).await);
        }
        m
    };
    let log_a = events(&b.store, &LogScope::Tenant("a".into()), 0).await;

    let heard = b.heard.events().len();
    let pruned = b.store.prune(cutoff).await.unwrap();
    assert_eq!(
        b.heard.events().len(),
        heard,
        "retention tells subscribers nothing"
    );
    assert_eq!(pruned.events as i64, old_a + old_b + 2);
    assert_eq!(pruned.cache_entries, 1, "the expired entry");
    assert_eq!(pruned.transitions, 2, "the completed run's two");
    assert_eq!(b.store.compacted_seq("a").await.unwrap(), old_a);
    assert_eq!(b.store.compacted_seq("b").await.unwrap(), old_b);
    assert_eq!(b.store.compacted_seq("c").await.unwrap(), 0);
    assert_eq!(
        b.store.head("a").await.unwrap(),
        log_a.len() as i64,
        "the head stays"
    );

    // The log keeps what came after the cutoff; reads from before the mark
    // start after it.
    let kept = events(&b.store, &LogScope::Tenant("a".into()), 0).await;
    assert_eq!(seqs(&kept), seqs(&log_a[old_a as usize..]));
    let from_mark = events(&b.store, &LogScope::Tenant("a".into()), old_a).await;
    assert_eq!(seqs(&from_mark), seqs(&kept));
    let kept_b = events(&b.store, &LogScope::Tenant("b".into()), 0).await;
    assert_eq!(
        seqs(&kept_b),
        ((old_b + 1)..=b.store.head("b").await.unwrap()).collect::<Vec<_>>()
    );
    // A log pruned whole keeps its head, and its numbering goes on from it.
    assert_eq!(b.store.compacted_seq("d").await.unwrap(), 2);
    assert_eq!(b.store.head("d").await.unwrap(), 2);
    assert!(
        events(&b.store, &LogScope::Tenant("d".into()), 0)
            .await
            .is_empty()
    );
    l.set_execution_state(&caller("d"), d1.id, propose(StateType::Completed))
        .await
        .unwrap();
    let d_log = events(&b.store, &LogScope::Tenant("d".into()), 0).await;
    assert_eq!(seqs(&d_log), [3]);
    assert_eq!(b.store.execution("d", d1.id).await.unwrap().unwrap().1, 3);
    let c_log = events(&b.store, &LogScope::Tenant("c".into()), 0).await;
    assert_eq!(seqs(&c_log), [1]);
    assert_eq!(recorded_execution(&c_log[0]), untouched);

    // Finished runs whose last event went keep only their current state.
    let mut removed = 0;
    for (run, states) in &before {
        let now = history(run.clone()).await;
        let closed = *run == done.id.to_string() || cached.iter().any(|t| t.id.to_string() == *run);
        if closed {
            assert_eq!(
                now,
                states[states.len() - 1..],
                "run {run} keeps its current state"
            );
        } else {
            assert_eq!(&now, states, "run {run} keeps its history");
        }
        removed += states.len() - now.len();
    }
    assert_eq!(pruned.states as usize, removed);
    // The runs themselves all stay.
    let (read, _) = b.store.execution("a", done.id).await.unwrap().unwrap();
    assert_eq!(read.run.state.state_type, StateType::Completed);

    // The finished run's transition id is forgotten: the proposal is
    // decided afresh. The FAILED run's is still answered.
    let replay = l
        .set_execution_state(&a, done.id, step(StateType::Completed, "d2"))
        .await
        .unwrap();
    assert_eq!((replay.status, replay.changed), (Status::Abort, false));
    let replay = l
        .set_execution_state(&a, failed.id, step(StateType::Failed, "f2"))
        .await
        .unwrap();
    assert_eq!((replay.status, replay.changed), (Status::Accept, false));

    // The entry that does not expire still answers; the expired one is gone.
    for (key, hit) in [("kept", true), ("expiring", false)] {
        let mut new = new_task_run(busy.id, &format!("{key}-again"));
        new.cache_key = Some(key.into());
        let (t, _) = l.create_task_run(&a, new).await.unwrap();
        let o = l
            .set_task_run_state(&a, t.id, propose(StateType::Running))
            .await
            .unwrap();
        assert_eq!(o.state.name == CACHED, hit, "cache key {key}");
    }

    // Again with the same cutoff: nothing more to do.
    let again = b.store.prune(cutoff).await.unwrap();
    assert_eq!(again, super::Pruned::default());
    assert_eq!(b.store.compacted_seq("a").await.unwrap(), old_a);
}

/// The sweep fails each PAUSED run whose pause timed out, once, even when
/// two sweeps run together; a run resumed in time, and one whose pause has
/// not timed out, are left alone.
pub(crate) async fn the_pause_sweep_fails_expired_pauses_once(b: Backend) {
    let (a, other) = (caller("a"), caller("b"));
    let l = &b.ledger;
    // Long enough for the runs below to be set up (and one resumed)
    // before it passes, on a slow machine too.
    let soon = in_(Duration::from_secs(2));
    let running = |c: Caller| async move {
        let (e, _) = l.create_execution(&c, new_execution()).await.unwrap();
        l.set_execution_state(&c, e.id, propose(StateType::Running))
            .await
            .unwrap();
        e
    };
    let expiring = running(a.clone()).await;
    l.set_execution_state(&a, expiring.id, paused_until(soon))
        .await
        .unwrap();
    let resumed = running(a.clone()).await;
    l.set_execution_state(&a, resumed.id, paused_until(soon))
        .await
        .unwrap();
    l.resume_execution(&a, resumed.id, Map::new())
        .await
        .unwrap();
    let waiting = running(a.clone()).await;
    l.set_execution_state(&a, waiting.id, paused_until(in_(Duration::from_secs(3600))))
        .await
        .unwrap();
    let (task, _) = l
        .create_task_run(&a, new_task_run(resumed.id, "k"))
        .await
        .unwrap();
    l.set_task_run_state(&a, task.id, propose(StateType::Running))
        .await
        .unwrap();
    l.set_task_run_state(&a, task.id, paused_until(soon))
        .await
        .unwrap();
    let (task_back, _) = l
        .create_task_run(&a, new_task_run(resumed.id, "j"))
        .await
        .unwrap();
    l.set_task_run_state(&a, task_back.id, paused_until(soon))
        .await
        .unwrap();
    l.set_task_run_state(&a, task_back.id, propose(StateType::Running))
        .await
        .unwrap();
    let theirs = running(other.clone()).await;
    l.set_execution_state(&other, theirs.id, paused_until(soon))
        .await
        .unwrap();

    assert!(
        Timestamp::now() < soon,
        "the setup took too long to check anything"
    );
    assert_eq!(
        l.expire_pauses().await.unwrap(),
        0,
        "nothing has timed out yet"
    );
    let heads = (
        b.store.head("a").await.unwrap(),
        b.store.head("b").await.unwrap(),
    );
    let wait = soon.saturating_since(Timestamp::now()) + Duration::from_millis(100);
    tokio::time::sleep(wait).await;
    let (one, two) = tokio::join!(l.expire_pauses(), l.expire_pauses());
    assert_eq!(one.unwrap() + two.unwrap(), 3);
    assert_eq!(l.expire_pauses().await.unwrap(), 0);
    assert_eq!(
        b.store.head("a").await.unwrap(),
        heads.0 + 2,
        "one event per run failed"
    );
    assert_eq!(b.store.head("b").await.unwrap(), heads.1 + 1);

    for (tenant, id) in [("a", expiring.id), ("b", theirs.id)] {
        let (e, _) = b.store.execution(tenant, id).await.unwrap().unwrap();
        assert_eq!(
            (e.run.state.state_type, e.run.state.name.as_str()),
            (StateType::Failed, PAUSE_TIMEOUT)
        );
        assert_eq!(e.run.error.as_ref().unwrap().error_type, PAUSE_TIMEOUT);
        let log = events(
            &b.store,
            &LogScope::ExecutionOnly(tenant.into(), id.to_string()),
            0,
        )
        .await;
        let last = log.last().unwrap();
        assert_eq!(record(last).previous_state_type, Some(StateType::Paused));
        assert_eq!(recorded_execution(last), e);
    }
    let (t, _) = b.store.task_run("a", task.id).await.unwrap().unwrap();
    assert_eq!(
        (t.run.state.state_type, t.run.state.name.as_str()),
        (StateType::Failed, PAUSE_TIMEOUT)
    );
    let (t, _) = b.store.task_run("a", task_back.id).await.unwrap().unwrap();
    assert_eq!(t.run.state.state_type, StateType::Running);
    let (e, _) = b.store.execution("a", resumed.id).await.unwrap().unwrap();
    assert_eq!(e.run.state.state_type, StateType::Running);
    let (e, _) = b.store.execution("a", waiting.id).await.unwrap().unwrap();
    assert_eq!(e.run.state.state_type, StateType::Paused);
}

/// An operation that fails inside the writer (here, by panicking after it
/// wrote) fails alone: what it wrote is rolled back, the writes beside it
/// commit with dense numbers, and later writes succeed.
pub(crate) async fn a_failing_write_fails_alone(b: Backend) {
    let a = caller("a");
    let creates = (0..20).map(|_| b.ledger.create_execution(&a, new_execution()));
    let (created, failed) = tokio::join!(
        futures::future::join_all(creates),
        b.store.write_then_panic("probe".into(), 7),
    );
    let created: Vec<Execution> = created.into_iter().map(|r| r.unwrap().0).collect();
    assert!(matches!(failed, Err(Error::Internal(_))), "{failed:?}");
    assert!(!b.store.key_usage(7).await.unwrap().contains_key("probe"));
    let (later, _) = b
        .ledger
        .create_execution(&a, new_execution())
        .await
        .unwrap();
    b.ledger
        .set_execution_state(&a, later.id, propose(StateType::Running))
        .await
        .unwrap();
    let log = events(&b.store, &LogScope::Tenant("a".into()), 0).await;
    assert_eq!(seqs(&log), (1..=22).collect::<Vec<_>>());
    assert_eq!(b.heard.seqs_of("a"), (1..=22).collect::<Vec<_>>());
    let logged: HashSet<String> = log.iter().map(|e| e.execution_id.clone()).collect();
    for e in created.iter().chain([&later]) {
        assert!(logged.contains(&e.id.to_string()));
        assert!(b.store.execution("a", e.id).await.unwrap().is_some());
    }
    // Key usage itself still records.
    b.store
        .record_key_usage(vec![("a".into(), "probe".into(), 7, 3)])
        .await
        .unwrap();
    assert_eq!(b.store.key_usage(7).await.unwrap().get("probe"), Some(&3));
}
