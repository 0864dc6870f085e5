//! The backend-agnostic integration tests again, each server on a fresh
//! PostgreSQL database of its own (the server named by
//! RUNLEDGER_TEST_POSTGRES) instead of a SQLite file.

#![allow(dead_code, unreachable_pub)]

mod helpers;
mod test_database;

/// The backend `helpers::spawn_app` starts its servers on.
pub const BACKEND: helpers::Backend = helpers::Backend::Postgres;

mod access;
mod history;
mod idempotency;
mod ledger;
mod lists;
mod orchestration;
mod quiet_streams;
mod run_streams;
mod serving;
mod snapshot_order;
mod stalled_streams;
mod startup;
mod streams;
mod supervision;
mod tenancy;
mod validation;
mod values;
