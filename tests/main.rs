//! Integration tests: the real server on 127.0.0.1, called through the
//! generated tonic clients.

#![allow(dead_code, unreachable_pub)]

mod helpers;

mod access;
mod ledger;
mod orchestration;
mod serving;
mod streams;
mod tenancy;
mod validation;
