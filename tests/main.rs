//! Integration tests: the real server on 127.0.0.1, called through the
//! generated tonic clients.

#![allow(dead_code, unreachable_pub)]

mod helpers;

mod executions;
mod ledger;
mod orchestration;
mod streams;
mod task_runs;
mod tenancy;
mod transitions;
mod validation;
