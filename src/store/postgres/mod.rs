//! The PostgreSQL backend: several servers (replicas) share one database.

use super::{OpenCause, OpenError, backend::Opened};

/// Opens (migrating if needed) the PostgreSQL database at `url`.
pub(crate) async fn open(url: &str) -> Result<Opened, OpenError> {
    Err(OpenError::new(
        crate::database_url::redacted(url),
        OpenCause::Url("PostgreSQL is not available in this build yet".into()),
    ))
}
