//! Who is calling. The runledger services sit behind the `Authenticator`,
//! which puts a `Caller` in each request's extensions; health checks and
//! reflection stay open.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use tonic::{Request, Status, metadata::MetadataMap, service::Interceptor};

use super::limits::{self, Limits};
use crate::{domain::Caller, keys::KeySet};

/// The tenant of a server running without API keys.
pub const OPEN_TENANT: &str = "default";
/// The name recorded for changes made without an API key.
pub const OPEN_CALLER: &str = "anonymous";

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
}

impl Authenticator {
    /// `limits` starts from the requests already counted today.
    pub fn new(keys: KeySet, open_allowed: bool, limits: Limits) -> Self {
        Authenticator {
            keys: Arc::new(RwLock::new(keys)),
            open_allowed,
            used: Arc::default(),
            limits: Arc::new(Mutex::new(limits)),
        }
    }

    /// Requests counted since last asked: (key id, day, requests that day).
    pub fn take_counts(&self) -> Vec<(String, i64, i64)> {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_dirty()
    }

    /// Replaces the keys in force (revocations and new keys take effect).
    pub fn replace(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
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

    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        match secret(metadata) {
            Some(secret) => {
                let key = keys
                    .key(secret)
                    .ok_or_else(|| Status::unauthenticated("unknown or revoked API key"))?;
                self.limits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .admit(key, Instant::now(), limits::today())?;
                let caller = key.caller.clone();
                self.used
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(crate::keys::hash_secret(secret));
                Ok(caller)
            }
            None if self.open_allowed && !keys.any => Ok(Caller {
                tenant_id: OPEN_TENANT.to_owned(),
                name: OPEN_CALLER.to_owned(),
            }),
            None => Err(Status::unauthenticated(
                "missing API key: send `authorization: Bearer <key>` or `x-api-key: <key>`",
            )),
        }
    }
}

/// The key from `authorization: Bearer <key>` or `x-api-key: <key>`.
fn secret(metadata: &MetadataMap) -> Option<&str> {
    if let Some(v) = metadata.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim);
    }
    metadata
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authenticate(req.metadata())?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller the authenticator identified.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credentials"))
}
