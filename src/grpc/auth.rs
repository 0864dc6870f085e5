//! Who is calling. Every request carries a `Caller` in its extensions,
//! put there by the interceptor in front of the services.

use tonic::{Request, Status};

use crate::domain::Caller;

/// The tenant of a server running without API keys.
pub const OPEN_TENANT: &str = "default";
/// The name recorded for changes made without an API key.
pub const OPEN_CALLER: &str = "anonymous";

/// The interceptor of a server running without API keys: every call acts
/// for the default tenant.
pub fn open_access(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.extensions_mut().insert(Caller {
        tenant_id: OPEN_TENANT.to_owned(),
        name: OPEN_CALLER.to_owned(),
    });
    Ok(req)
}

/// The caller the interceptor identified.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credentials"))
}
