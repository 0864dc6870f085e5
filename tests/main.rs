//! Integration tests: the real server on 127.0.0.1, called through the
//! generated tonic clients, each on a SQLite file of its own. The tests
//! about one backend run here only: `sqlite_file` on SQLite, and
//! `pg_ledger`, `pg_startup`, `postgres` and `replicas` on PostgreSQL
//! databases they make themselves.

#![allow(dead_code, unreachable_pub)]

mod helpers;
mod test_database;

/// The backend `helpers::spawn_app` starts its servers on; the
/// `on_postgres` test binary runs the backend-agnostic modules on PostgreSQL.
pub const BACKEND: helpers::Backend = helpers::Backend::Sqlite;

mod access;
mod bench;
mod history;
mod idempotency;
mod layering;
mod ledger;
mod lists;
mod orchestration;
mod pg_ledger;
mod pg_startup;
mod postgres;
mod quiet_streams;
mod readme;
mod replicas;
mod run_streams;
mod serving;
mod snapshot_order;
mod sqlite_file;
mod stalled_streams;
mod startup;
mod streams;
mod supervision;
mod tenancy;
mod validation;
mod values;
