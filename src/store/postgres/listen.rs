//! Word of commits from every server on the database: each transaction
//! that writes a tenant's events NOTIFYs `runledger_events` with
//! `<tenant>:<head>` (see `set_heads`), and this listener passes that on
//! as [`CommitSignal`]s. A lost connection loses notifications: after
//! every (re)connect the listener asks for a [`CommitSignal::Resync`].

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::mpsc;
use tracing::warn;

use crate::store::CommitSignal;

use super::EVENTS_CHANNEL as CHANNEL;

/// How long the listener waits before connecting again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Starts listening; the signals end when the receiver is dropped.
pub(crate) fn spawn(pool: PgPool) -> mpsc::Receiver<CommitSignal> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(listen(pool, tx));
    rx
}

async fn listen(pool: PgPool, tx: mpsc::Sender<CommitSignal>) {
    loop {
        let mut listener = match connect(&pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "listening for commits; trying again");
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        // Whatever committed before the listener listened was not heard.
        if tx.send(CommitSignal::Resync).await.is_err() {
            return;
        }
        loop {
            let received = tokio::select! {
                () = tx.closed() => return,
                r = listener.try_recv() => r,
            };
            let signal = match received {
                Ok(Some(n)) => match parse(n.payload()) {
                    Some(signal) => signal,
                    None => continue,
                },
                // The connection dropped; the next receive reconnects.
                Ok(None) => CommitSignal::Resync,
                Err(e) => {
                    warn!(error = %e, "listening for commits; reconnecting");
                    break;
                }
            };
            if tx.send(signal).await.is_err() {
                return;
            }
        }
    }
}

async fn connect(pool: &PgPool) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// `<tenant>:<head>`; the tenant may itself hold colons.
fn parse(payload: &str) -> Option<CommitSignal> {
    let (tenant, head) = payload.rsplit_once(':')?;
    Some(CommitSignal::Head {
        tenant: tenant.to_owned(),
        head: head.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_names_the_tenant_and_its_head() {
        assert_eq!(
            parse("acme:12"),
            Some(CommitSignal::Head {
                tenant: "acme".into(),
                head: 12
            })
        );
        assert_eq!(
            parse("a:b:3"),
            Some(CommitSignal::Head {
                tenant: "a:b".into(),
                head: 3
            })
        );
        assert_eq!(parse("nohead"), None);
        assert_eq!(parse("t:x"), None);
    }
}
