use std::process::ExitCode;

use clap::Parser;
use runledger::{
    App,
    config::{Cli, Command, KeysCommand, database_url},
    keys,
};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: a message that
/// already quotes its cause is not followed by it again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

async fn run() -> anyhow::Result<()> {
    let config = match Cli::parse().into_command() {
        Command::Serve(config) => config,
        Command::Bench(args) => {
            // Ctrl-C or SIGTERM stops the benchmark's servers and removes
            // its database before it exits.
            let mut interrupt = signal(SignalKind::interrupt())?;
            let mut term = signal(SignalKind::terminate())?;
            let stop = async move {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = term.recv() => {}
                }
            };
            runledger::bench::run_until(args, stop).await?;
            return Ok(());
        }
        Command::Keys { command } => return run_keys(command).await,
    };
    runledger::telemetry::init(config.log_format);

    let app = App::build(config).await?;
    let token = app.shutdown_token();
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
    app.run_until_stopped().await?;
    Ok(())
}

async fn run_keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            database,
            tenant,
            name,
            rate,
            daily_quota,
        } => {
            let mut conn = keys::connect(&database_url(&database)).await?;
            let new = keys::NewKey {
                tenant,
                name,
                rate,
                daily_quota,
            };
            let (key, secret) = keys::create(&mut conn, new).await?;
            println!(
                "created key {:?} for tenant {:?} (id {})",
                key.name, key.tenant_id, key.id
            );
            println!("the secret is shown only now; keep it safe:");
            println!("{secret}");
        }
        KeysCommand::List { database } => {
            let mut conn = keys::connect(&database_url(&database)).await?;
            println!(
                "{:<38} {:<16} {:<16} {:>8} {:>11} {:<20} {:<20} {:<20}",
                "id", "tenant", "name", "rate/s", "daily quota", "created", "last used", "revoked"
            );
            for k in keys::list(&mut conn).await? {
                let time = |t: Option<i64>| {
                    t.map_or("-".to_owned(), |us| {
                        let at = std::time::UNIX_EPOCH
                            + std::time::Duration::from_micros(us.max(0) as u64);
                        humantime::format_rfc3339_seconds(at).to_string()
                    })
                };
                println!(
                    "{:<38} {:<16} {:<16} {:>8} {:>11} {:<20} {:<20} {:<20}",
                    k.id,
                    k.tenant_id,
                    k.name,
                    k.rate.map_or("-".to_owned(), |r| r.to_string()),
                    k.daily_quota.map_or("-".to_owned(), |q| q.to_string()),
                    time(Some(k.created_at)),
                    time(k.last_used_at),
                    time(k.revoked_at),
                );
            }
        }
        KeysCommand::Revoke {
            database,
            name_or_id,
        } => {
            let mut conn = keys::connect(&database_url(&database)).await?;
            let key = keys::revoke(&mut conn, &name_or_id).await?;
            println!(
                "revoked key {:?} of tenant {:?} (id {})",
                key.name, key.tenant_id, key.id
            );
        }
    }
    Ok(())
}
