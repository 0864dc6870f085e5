//! The library's one error type. Each variant maps to one gRPC code in
//! `grpc::status`; internal causes are logged there, never sent.

use crate::domain::Violations;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidArgument(Violations),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    /// The server is shutting down, or lost its database: the request
    /// may or may not have taken effect, and may be sent again (with its
    /// idempotency key).
    #[error("the service is unavailable")]
    Unavailable,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        Error::InvalidArgument(Violations::single(field, description))
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Internal(format!("database: {e}"))
    }
}

impl From<Violations> for Error {
    fn from(v: Violations) -> Self {
        Error::InvalidArgument(v)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
