//! The servers under test: child `runledger serve` processes on
//! 127.0.0.1:0 sharing the benchmark's fresh database, each with memory of
//! its own.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
};

use super::BenchError;
use crate::store::Durability;

#[derive(Debug)]
pub(super) struct ChildServer {
    child: Child,
    pub(super) addr: SocketAddr,
    /// Its resident memory once listening, in bytes.
    pub(super) rss_at_start: Option<u64>,
}

/// How many lines of a server's log an error quotes, at most.
const QUOTED_LINES: usize = 3;

impl ChildServer {
    /// Starts replica `replica` on `database` (a URL; it reaches the
    /// server through the environment, not the command line other users
    /// can read). `streams`: how many streams the benchmark holds open on
    /// one server at once.
    pub(super) fn start(
        replica: usize,
        database: &str,
        durability: Durability,
        streams: usize,
    ) -> Result<Self, BenchError> {
        let exe = std::env::current_exe().map_err(|e| BenchError::Server(e.to_string()))?;
        let durability = match durability {
            Durability::Process => "process",
            Durability::Power => "power",
        };
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--durability",
                durability,
                "--max-streams-per-key",
                &(streams + 16).to_string(),
            ])
            .env("RUNLEDGER_DATABASE", database)
            .env("RUST_LOG", "warn,runledger::app=info")
            .env("RUNLEDGER_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Server(format!("starting server {replica}: {e}")))?;
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        // The last lines of its log, to say why it stopped if it does.
        let mut last = VecDeque::with_capacity(QUOTED_LINES);
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                let said = Vec::from(last).join(" / ");
                return Err(BenchError::Server(if said.is_empty() {
                    format!("server {replica} exited before listening")
                } else {
                    format!("server {replica} exited before listening: {said}")
                }));
            };
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
            {
                break addr;
            }
            let line = line.trim();
            if !line.is_empty() {
                if last.len() == QUOTED_LINES {
                    last.pop_front();
                }
                last.push_back(line.to_owned());
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let rss_at_start = rss_of(child.id());
        Ok(ChildServer {
            child,
            addr,
            rss_at_start,
        })
    }

    /// The server's resident memory, in bytes.
    pub(super) fn rss_bytes(&self) -> Option<u64> {
        rss_of(self.child.id())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // SIGTERM for a clean stop, then reap.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

pub(super) fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}
