//! Command line and environment.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{grpc::limits::Clock, store::Durability};

/// runledger: records, orchestrates and streams the state of executions
/// and their task runs.
#[derive(Debug, Parser)]
#[command(
    name = "runledger",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no command, `runledger` serves with these options.
    #[command(flatten)]
    pub serve: Config,
}

impl Cli {
    /// The command to run: `serve` unless another is given.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
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
        /// The ledger's database: a SQLite URL or path, or a postgres:// URL.
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
        /// The ledger's database: a SQLite URL or path, or a postgres:// URL.
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
        /// The ledger's database: a SQLite URL or path, or a postgres:// URL.
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

/// Where to listen: `host:port`, the host an IP address or a name to
/// resolve (`[::1]:50051`, `localhost:50051`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    host: String,
    port: u16,
}

impl Listen {
    /// The addresses the host resolves to, with the port.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{:?} resolves to no address", self.host),
            ));
        }
        Ok(addrs)
    }
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or("expected HOST:PORT, e.g. 127.0.0.1:50051 or localhost:50051")?;
        let port = port
            .parse()
            .map_err(|_| format!("the port must be a number from 0 to 65535, not {port:?}"))?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{v6:?} is not an IPv6 address"))?
                .to_string(),
            None if host.contains(':') => {
                return Err("write an IPv6 address in brackets, e.g. [::1]:50051".into());
            }
            None if host.is_empty() => return Err("the host is missing, e.g. 127.0.0.1".into()),
            None => host.to_owned(),
        };
        Ok(Listen { host, port })
    }
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Listen {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How the service runs.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on: an IP address or a host name, and a port.
    #[arg(long, env = "RUNLEDGER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: Listen,

    /// PEM certificate chain to serve TLS with (with --tls-key).
    #[arg(long, env = "RUNLEDGER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the certificate (with --tls-cert).
    #[arg(long, env = "RUNLEDGER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve without TLS on a non-loopback address. API keys travel in
    /// headers, so anyone on the path can read them.
    #[arg(long, env = "RUNLEDGER_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,

    /// The database: a SQLite URL or path (created and migrated on start;
    /// one server per file), or postgres://USER@HOST:PORT/DATABASE (an
    /// existing database, migrated on start; several servers may share
    /// it).
    #[arg(
        long,
        env = "RUNLEDGER_DATABASE",
        default_value = "sqlite://runledger.db"
    )]
    pub database: String,

    /// SQLite only. `process`: an acknowledged write survives a crash of
    /// the process (WAL, synchronous=NORMAL). `power`: it also survives
    /// power loss (synchronous=FULL), at a cost in write throughput.
    /// PostgreSQL's durability is the server's own (synchronous_commit).
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

    /// How long a stream may hold response bytes its client does not read
    /// while the server holds more than its send budget for all streams;
    /// then it is reset and its client resumes from its last sequence.
    #[arg(long, env = "RUNLEDGER_STALLED_STREAM_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub stalled_stream_timeout: Duration,

    /// How long shutdown waits for open calls before closing them.
    #[arg(long, env = "RUNLEDGER_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "5s")]
    pub shutdown_grace: Duration,

    /// Serve without API keys on a non-loopback address. Without this, a
    /// server whose database has no keys only runs open on loopback.
    #[arg(long, env = "RUNLEDGER_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// How many streams one API key may hold open at once.
    #[arg(long, env = "RUNLEDGER_MAX_STREAMS_PER_KEY", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_key: u32,

    /// How many concurrent calls and streams one connection may carry
    /// (HTTP/2 MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "RUNLEDGER_MAX_STREAMS_PER_CONNECTION", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// How often an idle connection is pinged (HTTP/2 PING), so that dead
    /// clients and their streams are found.
    #[arg(long, env = "RUNLEDGER_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "RUNLEDGER_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub keepalive_timeout: Duration,

    /// Idle time before TCP keepalive probes start on a connection.
    #[arg(long, env = "RUNLEDGER_TCP_KEEPALIVE", value_parser = humantime::parse_duration, default_value = "60s")]
    pub tcp_keepalive: Duration,

    /// Log format.
    #[arg(long, env = "RUNLEDGER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// The clock that decides the UTC day of the daily quotas.
    #[arg(skip)]
    pub clock: Clock,
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
            listen: listen.into(),
            database: database.into(),
            ..Self::new_from_env()?
        })
    }

    /// The database URL, accepting a plain path too.
    pub fn database_url(&self) -> String {
        database_url(&self.database)
    }
}

/// A database URL from a URL or a plain path (a SQLite file).
pub fn database_url(database: &str) -> String {
    if database.starts_with("sqlite:")
        || database.starts_with("postgres://")
        || database.starts_with("postgresql://")
    {
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

    fn listen_of(args: &[&str]) -> Listen {
        match Cli::try_parse_from(args).unwrap().into_command() {
            Command::Serve(c) => c.listen,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn serve_is_the_default_command_and_takes_host_names() {
        let at = |s: &str| s.parse::<Listen>().unwrap();
        assert_eq!(
            listen_of(&["runledger", "--listen", "localhost:50052"]),
            at("localhost:50052")
        );
        assert_eq!(
            listen_of(&["runledger", "serve", "--listen", "[::1]:7"]).to_string(),
            "[::1]:7"
        );
        assert_eq!(listen_of(&["runledger"]), at("127.0.0.1:50051"));
        for bad in [
            "localhost",
            ":50051",
            "::1:50051",
            "localhost:http",
            "[nope]:1",
        ] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
        // Serve's options belong to serving, not to the other commands.
        Cli::try_parse_from(["runledger", "--listen", "localhost:1", "keys", "list"]).unwrap_err();
    }
}
