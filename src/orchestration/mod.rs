//! The transition rules (pure, in `rules`) and the use cases that apply
//! them inside the store's write transactions.

pub mod rules;
pub mod sweeper;
mod usecases;

pub use usecases::{Ledger, SetStateOutcome};
pub(crate) use usecases::{execution_not_found, task_run_not_found};
