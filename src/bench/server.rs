//! The server under test: a child `runledger serve` process on
//! 127.0.0.1:0 with a fresh database, so its memory is its own.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
};

use super::BenchError;
use crate::store::Durability;

#[derive(Debug)]
pub(super) struct ChildServer {
    child: Child,
    pub(super) addr: SocketAddr,
}

impl ChildServer {
    /// `streams`: how many streams the benchmark holds open at once.
    pub(super) fn start(
        db: &Path,
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
                "--database",
            ])
            .arg(db)
            .env("RUST_LOG", "warn,runledger::app=info")
            .env("RUNLEDGER_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Server(format!("starting the server: {e}")))?;
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                return Err(BenchError::Server(
                    "the server exited before listening".into(),
                ));
            };
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
            {
                break addr;
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(ChildServer { child, addr })
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
