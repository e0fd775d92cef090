//! The agent: what runs inside an environment. A batch in, JSON lines out.

mod cell;
mod codex;
mod engine;
pub mod init;
mod judge;
mod kmsg;
mod lsm;
mod observe;
mod proc_events;
mod run;
pub mod witness;

/// The Codex release nsmatrix pins as its reference (the scenarios' output was recorded from it).
pub use codex::OUTPUT_RECORDED_FROM as PINNED_CODEX;

pub(crate) use run::{environment_facts, run_batch};
