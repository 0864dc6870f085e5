//! Who is calling. The runledger services sit behind `Authenticated`,
//! which checks each call's API key, counts it against the key's limits,
//! caps the key's open streams and puts a `Caller` in the request's
//! extensions; health checks and reflection stay open.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    num::NonZeroUsize,
    pin::Pin,
    sync::{Arc, LazyLock, Mutex, RwLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use lru::LruCache;
use prost::Message;
use tokio::sync::Semaphore;
use tonic::{
    Request, Status,
    body::Body,
    codegen::{
        Service,
        http::{self, HeaderMap},
    },
    server::NamedService,
};

use super::limits::{Clock, Limits};
use crate::{
    domain::Caller,
    keys::{ActiveKey, KeySet},
    orchestration::Ledger,
};

/// The tenant of a server running without API keys.
pub const OPEN_TENANT: &str = "default";
/// The name recorded for changes made without an API key.
pub const OPEN_CALLER: &str = "anonymous";

/// How long an answer from the database about a key not (yet) among the
/// keys in force is trusted.
const LOOKUP_TTL: Duration = Duration::from_secs(1);
/// How many such answers are remembered.
const LOOKUP_CACHE: NonZeroUsize = NonZeroUsize::new(4096).unwrap();
/// How many key lookups may query the database at once.
const CONCURRENT_LOOKUPS: usize = 4;

/// What the database said about a secret hash, and when.
type Answer = (Instant, Option<ActiveKey>);

/// Checks each call's API key against the keys in force.
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: Arc<RwLock<KeySet>>,
    /// Whether calls without a key may act for the open tenant while the
    /// database has no keys at all (loopback, or explicitly allowed).
    open_allowed: bool,
    /// Secret hashes used since they were last recorded.
    used: Arc<Mutex<HashSet<String>>>,
    limits: Arc<Mutex<Limits>>,
    clock: Clock,
    /// Where keys made since the last reload are found.
    ledger: Option<Ledger>,
    /// Recent answers from the database, by secret hash: the key, or none.
    looked_up: Arc<Mutex<LruCache<String, Answer>>>,
    lookups: Arc<Semaphore>,
    streams: StreamSlots,
}

impl Authenticator {
    /// `limits` starts from the requests already counted today; a key not
    /// among `keys` is looked up in the ledger before it is refused.
    pub fn new(
        keys: KeySet,
        open_allowed: bool,
        limits: Limits,
        clock: Clock,
        ledger: Option<Ledger>,
        max_streams_per_key: u32,
    ) -> Self {
        Authenticator {
            keys: Arc::new(RwLock::new(keys)),
            open_allowed,
            used: Arc::default(),
            limits: Arc::new(Mutex::new(limits)),
            clock,
            ledger,
            looked_up: Arc::new(Mutex::new(LruCache::new(LOOKUP_CACHE))),
            lookups: Arc::new(Semaphore::new(CONCURRENT_LOOKUPS)),
            streams: StreamSlots {
                max: max_streams_per_key,
                open: Arc::default(),
            },
        }
    }

    /// Requests counted since last asked: (tenant, key id, day, requests
    /// to add to that day's count).
    pub fn take_counts(&self) -> Vec<(String, String, i64, i64)> {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_dirty()
    }

    /// Puts back counts that could not be recorded, to record later.
    pub fn restore_counts(&self, counts: Vec<(String, String, i64, i64)>) {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(counts);
    }

    /// Takes today's request totals as recorded by every server.
    pub fn refresh_counts(&self, day: i64, totals: std::collections::HashMap<String, i64>) {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refresh(day, totals);
    }

    /// Replaces the keys in force (revocations and new keys take effect).
    pub fn replace(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        // The keys now loaded supersede what was looked up before.
        self.looked_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether calls without a key are served now.
    pub fn is_open(&self) -> bool {
        self.open_allowed && !self.keys.read().unwrap_or_else(|e| e.into_inner()).any
    }

    /// The secret hashes used since the last call.
    pub fn take_used(&self) -> Vec<String> {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect()
    }

    /// Counts a call of `key` against its limits, or refuses it. On a
    /// database other servers share, a key's rate and quota are taken from
    /// the store, so that they hold for all servers together; this
    /// server's own counts refuse early what is over them already.
    async fn admit(&self, key: &ActiveKey) -> Result<(), Status> {
        let today = self.clock.today();
        let limits = || self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let shared = self
            .ledger
            .as_ref()
            .filter(|l| l.store().is_shared() && (key.rate.is_some() || key.daily_quota.is_some()));
        let Some(ledger) = shared else {
            return limits().admit(key, Instant::now(), today);
        };
        // The rate is the store's bucket alone, so that the wait it gives
        // is the one that holds.
        limits().check(key, Instant::now(), today, false)?;
        if let Some(rate) = key.rate
            && let Some(wait) = ledger.take_token(key, rate).await.map_err(Status::from)?
        {
            return Err(super::limits::rate_exhausted(rate, wait));
        }
        let counted = match key.daily_quota {
            Some(quota) => {
                if !ledger
                    .take_quota(key, today.0, quota)
                    .await
                    .map_err(Status::from)?
                {
                    return Err(super::limits::quota_exhausted(quota, today.1));
                }
                super::limits::Counted::InStore
            }
            None => super::limits::Counted::Here,
        };
        limits().count(key, today.0, counted);
        Ok(())
    }

    /// Who sends these headers, counting the call against the key's limits.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Status> {
        let Some(secret) = secret(headers)? else {
            return if self.is_open() {
                Ok(Caller {
                    tenant_id: OPEN_TENANT.to_owned(),
                    name: OPEN_CALLER.to_owned(),
                })
            } else {
                Err(Status::unauthenticated(
                    "missing API key: send `authorization: Bearer <key>` or `x-api-key: <key>`",
                ))
            };
        };
        let hash = crate::keys::hash_secret(secret);
        let key = self
            .key(secret, &hash)
            .await?
            .ok_or_else(|| Status::unauthenticated("unknown or revoked API key"))?;
        self.admit(&key).await?;
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash);
        Ok(key.caller)
    }

    /// The key in force with this secret: among the keys loaded, else as
    /// the database has it now (remembered briefly, either way).
    async fn key(&self, secret: &str, hash: &str) -> Result<Option<ActiveKey>, Status> {
        if let Some(key) = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_hash(hash)
        {
            return Ok(Some(key.clone()));
        }
        let Some(ledger) = &self.ledger else {
            return Ok(None);
        };
        if !crate::keys::looks_like_secret(secret) {
            return Ok(None);
        }
        if let Some(answer) = self.remembered(hash) {
            return Ok(answer);
        }
        let _permit = self
            .lookups
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        // Another call may have asked while this one waited.
        if let Some(answer) = self.remembered(hash) {
            return Ok(answer);
        }
        let answer = ledger.find_key(hash).await.map_err(Status::from)?;
        if answer.is_some() {
            // The database has keys now: calls without one are refused.
            self.keys.write().unwrap_or_else(|e| e.into_inner()).any = true;
        }
        self.looked_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(hash.to_owned(), (Instant::now(), answer.clone()));
        Ok(answer)
    }

    fn remembered(&self, hash: &str) -> Option<Option<ActiveKey>> {
        let mut cache = self.looked_up.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(hash) {
            Some((at, answer)) if at.elapsed() < LOOKUP_TTL => Some(answer.clone()),
            Some(_) => {
                cache.pop(hash);
                None
            }
            None => None,
        }
    }

    /// Puts `inner` behind this authenticator.
    pub fn wrap<S>(&self, inner: S) -> Authenticated<S> {
        Authenticated {
            inner,
            auth: self.clone(),
        }
    }
}

/// The key from `authorization: Bearer <key>` or `x-api-key: <key>`;
/// none if neither header is sent.
fn secret(headers: &HeaderMap) -> Result<Option<&str>, Status> {
    if let Some(v) = headers.get("authorization") {
        let bad = || Status::unauthenticated("the authorization header must be `Bearer <key>`");
        let v = v.to_str().map_err(|_| bad())?.trim();
        let key = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(bad)?;
        return Ok(Some(key));
    }
    match headers.get("x-api-key") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(Some)
            .ok_or_else(|| Status::unauthenticated("the x-api-key header must be `<key>`")),
    }
}

/// The open streams of each caller, capped.
#[derive(Debug, Clone)]
struct StreamSlots {
    max: u32,
    open: Arc<Mutex<HashMap<(String, String), u32>>>,
}

impl StreamSlots {
    fn take(&self, caller: &Caller) -> Result<StreamSlot, Status> {
        let who = (caller.tenant_id.clone(), caller.name.clone());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(who.clone()).or_insert(0);
        if *n >= self.max {
            return Err(Status::resource_exhausted(format!(
                "limit of {} open streams per API key reached: close one before opening another",
                self.max
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            who,
        })
    }
}

/// One open stream of a caller, given back when dropped.
#[derive(Debug)]
struct StreamSlot {
    slots: StreamSlots,
    who: (String, String),
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.who);
            }
        }
    }
}

/// The paths (`/package.Service/Method`) of the server-streaming methods.
static STREAMING_METHODS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let set = prost_types::FileDescriptorSet::decode(super::pb::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set built with the crate decodes");
    let mut paths = HashSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                if method.server_streaming() {
                    paths.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    paths
});

/// A service behind the authenticator.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: Authenticator,
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Authenticated<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The ready service answers this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let caller = match auth.authenticate(req.headers()).await {
                Ok(caller) => caller,
                Err(status) => return Ok(status.into_http()),
            };
            let slot = if STREAMING_METHODS.contains(req.uri().path()) {
                match auth.streams.take(&caller) {
                    Ok(slot) => Some(slot),
                    Err(status) => return Ok(status.into_http()),
                }
            } else {
                None
            };
            req.extensions_mut().insert(caller);
            let response = inner.call(req).await?;
            Ok(match slot {
                Some(slot) => response.map(|body| Body::new(Holding { body, _slot: slot })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its stream's slot until it is dropped.
#[derive(Debug)]
struct Holding {
    body: Body,
    _slot: StreamSlot,
}

impl http_body::Body for Holding {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The caller the authenticator identified.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credentials"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streaming_methods_come_from_the_contract() {
        assert!(STREAMING_METHODS.contains("/runledger.v1.EventService/Subscribe"));
        assert!(STREAMING_METHODS.contains("/runledger.v1.ExecutionService/StreamExecutionStatus"));
        assert!(!STREAMING_METHODS.contains("/runledger.v1.ExecutionService/GetExecution"));
    }

    #[test]
    fn an_authorization_header_without_bearer_is_named() {
        let mut h = HeaderMap::new();
        assert_eq!(secret(&h).unwrap(), None);
        h.insert("authorization", "Bearer rl_x".parse().unwrap());
        assert_eq!(secret(&h).unwrap(), Some("rl_x"));
        h.insert("authorization", "rl_x".parse().unwrap());
        let err = secret(&h).unwrap_err();
        assert_eq!(
            err.message(),
            "the authorization header must be `Bearer <key>`"
        );
    }
}
