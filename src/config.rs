//! Command line and environment.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::store::Durability;

/// runledger: records, orchestrates and streams the state of executions
/// and their task runs.
#[derive(Debug, Parser)]
#[command(name = "runledger", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service (the default when no command is given).
    Serve(Config),
    /// Measure throughput, latency, fan-out and memory of a server.
    Bench(crate::bench::BenchArgs),
    /// Create, list and revoke API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once, alone on the last line.
    Create {
        #[arg(
            long,
            env = "RUNLEDGER_DATABASE",
            default_value = "sqlite://runledger.db"
        )]
        database: String,
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// The key's name, recorded as `updated_by` on what it changes.
        #[arg(long)]
        name: String,
        /// Requests per second the key may make.
        #[arg(long)]
        rate: Option<f64>,
        /// Requests per UTC day the key may make.
        #[arg(long)]
        daily_quota: Option<i64>,
    },
    /// List keys (never their secrets).
    List {
        #[arg(
            long,
            env = "RUNLEDGER_DATABASE",
            default_value = "sqlite://runledger.db"
        )]
        database: String,
    },
    /// Revoke a key by name or id; a running server stops accepting it
    /// within about a second.
    Revoke {
        #[arg(
            long,
            env = "RUNLEDGER_DATABASE",
            default_value = "sqlite://runledger.db"
        )]
        database: String,
        name_or_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the service runs.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "RUNLEDGER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// SQLite database URL (or path); created and migrated on start.
    #[arg(
        long,
        env = "RUNLEDGER_DATABASE",
        default_value = "sqlite://runledger.db"
    )]
    pub database: String,

    /// `process`: an acknowledged write survives a crash of the process
    /// (WAL, synchronous=NORMAL). `power`: it also survives power loss
    /// (synchronous=FULL), at a cost in write throughput.
    #[arg(
        long,
        env = "RUNLEDGER_DURABILITY",
        value_enum,
        default_value = "process"
    )]
    pub durability: Durability,

    /// How long the event log keeps events; streams resuming from an older
    /// sequence get OUT_OF_RANGE. Once the last event of a finished run
    /// (terminal or deleted) is past retention, its state history and
    /// recorded transition results go too, except its current state, which
    /// ListStates and Get keep returning; a running run keeps its history.
    /// Cache entries go once they expire.
    #[arg(long, env = "RUNLEDGER_EVENT_RETENTION", value_parser = humantime::parse_duration, default_value = "7d")]
    pub event_retention: Duration,

    /// How often retention runs (events, history of finished runs, expired
    /// cache entries).
    #[arg(long, env = "RUNLEDGER_PRUNE_INTERVAL", value_parser = humantime::parse_duration, default_value = "1m")]
    pub prune_interval: Duration,

    /// How often PAUSED runs are checked for a timed-out pause.
    #[arg(long, env = "RUNLEDGER_PAUSE_SWEEP_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub pause_sweep_interval: Duration,

    /// How many recent events are held in memory for live subscribers; a
    /// subscriber further behind reads from the log instead.
    #[arg(long, env = "RUNLEDGER_LIVE_BUFFER", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub live_buffer: u32,

    /// How many bytes of recent events are held in memory at most (within
    /// --live-buffer); a subscriber further behind reads from the log.
    #[arg(long, env = "RUNLEDGER_LIVE_BUFFER_BYTES", default_value_t = crate::stream::LIVE_BUFFER_BYTES as u64, value_parser = clap::value_parser!(u64).range(65_536..=4_294_967_296))]
    pub live_buffer_bytes: u64,

    /// How long shutdown waits for open calls before closing them.
    #[arg(long, env = "RUNLEDGER_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "5s")]
    pub shutdown_grace: Duration,

    /// Serve without API keys on a non-loopback address. Without this, a
    /// server whose database has no keys only runs open on loopback.
    #[arg(long, env = "RUNLEDGER_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Log format.
    #[arg(long, env = "RUNLEDGER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The configuration `runledger serve` would run with: flags at their
    /// defaults, overridden by `RUNLEDGER_*` variables.
    pub fn new_from_env() -> Result<Self, clap::Error> {
        match Cli::try_parse_from(["runledger", "serve"])?.command {
            Some(Command::Serve(config)) => Ok(config),
            _ => unreachable!("the serve command was given"),
        }
    }

    /// The defaults, listening on `listen` with the database at `database`.
    pub fn new(listen: SocketAddr, database: impl Into<String>) -> Result<Self, clap::Error> {
        Ok(Config {
            listen,
            database: database.into(),
            ..Self::new_from_env()?
        })
    }

    /// The database URL, accepting a plain path too.
    pub fn database_url(&self) -> String {
        database_url(&self.database)
    }
}

/// A database URL from a URL or a plain path.
pub fn database_url(database: &str) -> String {
    if database.starts_with("sqlite:") {
        database.to_owned()
    } else {
        format!("sqlite://{database}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_parses_with_defaults() {
        let c = Config::new("127.0.0.1:0".parse().unwrap(), "x.db").unwrap();
        assert_eq!(c.database_url(), "sqlite://x.db");
        assert_eq!(c.event_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.durability, Durability::Process);
        Cli::try_parse_from(["runledger", "serve", "--listen", "nope"]).unwrap_err();
    }
}
