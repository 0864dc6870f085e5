//! Wires the store, the feed and the services together, binds the listener
//! and runs until the shutdown token fires.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming};
use tracing::{error, info, warn};

use crate::{
    Config, Error,
    config::Listen,
    domain::Timestamp,
    grpc::{self, EventApi, ExecutionApi, TaskRunApi, pb},
    orchestration::Ledger,
    store::{OpenError, Pruned, Store, WriterStopped, WriterTask},
    stream::Feed,
};

/// The largest request accepted: a 1 MiB input and the rest of its
/// request, with room to spare.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How long shutdown waits for the read connections in use to come back.
const CLOSE_READS_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: Listen,
        source: std::io::Error,
    },
    #[error(
        "{0} is not a loopback address and TLS is off: API keys travel in headers, so serve \
         TLS with --tls-cert and --tls-key, or pass --allow-plaintext to serve without it"
    )]
    Plaintext(Listen),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("reading the database: {0}")]
    Store(Error),
    #[error(
        "the database has no API keys and {0} is not a loopback address: create a key with \
         `runledger keys create`, or pass --allow-unauthenticated to serve without keys"
    )]
    Unauthenticated(Listen),
    #[error("building reflection: {0}")]
    Reflection(String),
    #[error("starting the live feed: {0}")]
    Feed(std::io::Error),
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}; see the log for the cause")]
    WriterStopped(#[from] WriterStopped),
}

/// A built service, bound and ready to run.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    store: Store,
    writer: WriterTask,
    feed: Feed,
    auth: grpc::auth::Authenticator,
    shutdown: CancellationToken,
    config: Config,
    tls: Option<ServerTlsConfig>,
    budget: grpc::send_budget::SendBudgetLayer,
}

impl App {
    /// Binds the listener (port 0 picks a free one), then opens the
    /// database: a port in use is reported before the database is touched.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let bind_error = |source| StartError::Bind {
            addr: config.listen.clone(),
            source,
        };
        let addrs = config.listen.resolve().await.map_err(bind_error)?;
        let loopback = addrs.iter().all(|a| a.ip().is_loopback());
        let tls = tls_config(&config)?;
        if tls.is_none() && !loopback && !config.allow_plaintext {
            return Err(StartError::Plaintext(config.listen.clone()));
        }
        let listener = TcpListener::bind(&addrs[..]).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let feed = Feed::with_limits(
            config.live_buffer as usize,
            config.live_buffer_bytes as usize,
        );
        let listener_of_commits = feed.listener().map_err(StartError::Feed)?;
        let (store, writer) = Store::open(
            &config.database_url(),
            config.durability,
            listener_of_commits,
        )
        .await?;
        if store.is_shared() {
            feed.set_shared_database();
        }
        let keys = store.load_keys().await.map_err(StartError::Store)?;
        if !keys.any && !loopback && !config.allow_unauthenticated {
            return Err(StartError::Unauthenticated(config.listen.clone()));
        }
        let (day, _) = config.clock.today();
        let counted = store.key_usage(day).await.map_err(StartError::Store)?;
        let auth = grpc::auth::Authenticator::new(
            keys,
            loopback || config.allow_unauthenticated,
            grpc::limits::Limits::new(day, counted),
            config.clock.clone(),
            Some(Ledger::new(store.clone())),
            config.max_streams_per_key,
        );
        if auth.is_open() {
            warn!(
                tenant = grpc::auth::OPEN_TENANT,
                "no API keys: serving without authentication until a key is created"
            );
        }
        let budget = grpc::send_budget::SendBudgetLayer::new(config.stalled_stream_timeout);
        Ok(App {
            budget,
            listener,
            addr,
            store,
            writer,
            feed,
            auth,
            shutdown: CancellationToken::new(),
            config,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store, for tests that reach below the service.
    #[doc(hidden)]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The response bytes handed to HTTP/2 and not yet written to the
    /// clients' connections, over all streams.
    pub fn send_budget(&self) -> grpc::send_budget::SendBudgetLayer {
        self.budget.clone()
    }

    /// Counts of the store writer's work, readable while the app runs.
    pub fn writer_stats(&self) -> std::sync::Arc<crate::store::WriterStats> {
        self.store.writer_stats()
    }

    /// Counts of the event log's reads, readable while the app runs.
    pub fn read_stats(&self) -> std::sync::Arc<crate::store::ReadStats> {
        self.store.read_stats()
    }

    /// Cancelling this token shuts the service down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token fires: then stops accepting, ends
    /// the streams with UNAVAILABLE, lets the calls in flight finish (for
    /// up to the shutdown grace) and commits every write already accepted.
    pub async fn run_until_stopped(self) -> Result<(), StartError> {
        let App {
            listener,
            addr,
            store,
            writer,
            feed,
            auth,
            shutdown,
            config,
            tls,
            budget,
        } = self;

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in grpc::SERVICE_NAMES {
            health
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        // Health says NOT_SERVING from the moment shutdown begins, and the
        // service shuts down if the writer stops: no write could be made.
        let supervisor = tokio::spawn(supervise(writer, health, shutdown.clone()));
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| StartError::Reflection(e.to_string()))?;

        // On a database other servers write to as well, their commits reach
        // this server's subscribers through the tailer.
        let tailer = store.is_shared().then(|| {
            tokio::spawn(crate::stream::tailer::run(
                feed.clone(),
                store.clone(),
                store.take_signals(),
                shutdown.clone(),
            ))
        });
        let ledger = Ledger::new(store.clone());
        let sweeper = tokio::spawn(crate::orchestration::sweeper::run(
            ledger.clone(),
            config.pause_sweep_interval,
            shutdown.clone(),
        ));
        let streams = crate::stream::Streams {
            ledger,
            feed,
            shutdown: shutdown.clone(),
        };
        let keys = tokio::spawn(refresh_keys(
            store.clone(),
            auth.clone(),
            config.clock.clone(),
            shutdown.clone(),
        ));
        let pruner = tokio::spawn(prune_events(
            store.clone(),
            config.event_retention,
            config.prune_interval,
            shutdown.clone(),
        ));

        // Small messages: do not wait to coalesce them.
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(config.tcp_keepalive));
        let mut builder = Server::builder()
            // What clients that do not read cost stays bounded.
            .layer(budget.clone())
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .max_concurrent_streams(config.max_streams_per_connection);
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                auth.wrap(
                    pb::execution_service_server::ExecutionServiceServer::new(ExecutionApi::new(
                        streams.clone(),
                    ))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
                ),
            )
            .add_service(
                auth.wrap(
                    pb::task_run_service_server::TaskRunServiceServer::new(TaskRunApi::new(
                        streams.clone(),
                    ))
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
                ),
            )
            .add_service(
                auth.wrap(
                    pb::event_service_server::EventServiceServer::new(EventApi::new(streams))
                        .max_decoding_message_size(MAX_REQUEST_BYTES),
                ),
            )
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        // The services hold what the authenticator needs from here on.
        drop(auth);

        info!(%addr, tls = config.tls_cert.is_some(), database = %crate::database_url::redacted(&config.database_url()), "runledger listening");
        let grace = config.shutdown_grace;
        let served = tokio::select! {
            r = server => r,
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                warn!(?grace, "calls still open after the shutdown grace; closing them");
                Ok(())
            }
        };
        shutdown.cancel();
        if let Some(tailer) = tailer {
            let _ = tailer.await;
        }
        let _ = pruner.await;
        let _ = keys.await;
        let _ = sweeper.await;
        // Calls still open (their clients gone quiet) may hold the store:
        // the writer is told to stop rather than left to the last handle.
        // It commits what it has accepted and refuses what comes later.
        store.stop_writes();
        if tokio::time::timeout(CLOSE_READS_WAIT, store.close_reads())
            .await
            .is_err()
        {
            warn!(wait = ?CLOSE_READS_WAIT, "read connections still in use; not waiting for them");
        }
        drop(store);
        let writer = supervisor.await.unwrap_or(Err(WriterStopped));
        info!("runledger stopped");
        served?;
        Ok(writer?)
    }
}

/// Marks every service NOT_SERVING when shutdown begins, and begins it if
/// the writer stops first; answers how the writer ended.
async fn supervise(
    writer: WriterTask,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) -> Result<(), WriterStopped> {
    let writer = writer.wait();
    tokio::pin!(writer);
    let early = tokio::select! {
        () = shutdown.cancelled() => None,
        ended = &mut writer => Some(ended),
    };
    if early.is_some() {
        error!("the store's writer stopped; shutting down");
        shutdown.cancel();
    }
    for name in grpc::SERVICE_NAMES.iter().copied().chain([""]) {
        health
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    match early {
        // The service still held the store: stopping now is a defect.
        Some(_) => Err(WriterStopped),
        None => writer.await,
    }
}

/// The TLS settings from the certificate and key files, if given.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, StartError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| StartError::Tls(format!("cannot read {}: {e}", path.display())))
    };
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    // Checked now, so that a bad certificate or key stops the start.
    Server::builder().tls_config(tls.clone()).map_err(|e| {
        StartError::Tls(match std::error::Error::source(&e) {
            Some(cause) => cause.to_string(),
            None => e.to_string(),
        })
    })?;
    Ok(Some(tls))
}

/// Reloads the keys in force every second, so that new and revoked keys
/// take effect on a running server, and records the keys' request counts
/// (a crash loses at most the last second's) and when they were last used.
async fn refresh_keys(
    store: Store,
    auth: grpc::auth::Authenticator,
    clock: grpc::limits::Clock,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        let counts = auth.take_counts();
        if !counts.is_empty()
            && let Err(e) = store.record_key_usage(counts.clone()).await
        {
            warn!(error = %e, "recording API key request counts");
            // Recorded with the next ones.
            auth.restore_counts(counts);
        }
        // Other servers on the database count too.
        if store.is_shared() {
            let (day, _) = clock.today();
            match store.key_usage(day).await {
                Ok(totals) => auth.refresh_counts(day, totals),
                Err(e) => warn!(error = %e, "reading API key request counts"),
            }
        }
        let used = auth.take_used();
        if !used.is_empty()
            && let Err(e) = store.touch_keys(used).await
        {
            warn!(error = %e, "recording API key use");
        }
        // Reloaded after recording, so that a key's use is on record by the
        // time its revocation takes effect.
        match store.load_keys().await {
            Ok(_) if stopping => {}
            Ok(keys) => {
                let was_open = auth.is_open();
                auth.replace(keys);
                if was_open && !auth.is_open() {
                    info!("API keys exist now: calls without a key are refused");
                }
            }
            Err(e) => warn!(error = %e, "reloading API keys"),
        }
        if stopping {
            break;
        }
    }
}

async fn prune_events(
    store: Store,
    retention: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(cutoff) = Timestamp::now().checked_sub(retention) else {
            continue;
        };
        match store.prune(cutoff).await {
            Ok(p) if p == Pruned::default() => {}
            Ok(p) => info!(
                events = p.events,
                states = p.states,
                transitions = p.transitions,
                cache_entries = p.cache_entries,
                "pruned past retention"
            ),
            Err(e) => warn!(error = %e, "pruning past retention"),
        }
    }
}
