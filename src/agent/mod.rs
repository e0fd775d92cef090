//! The agent: what runs inside an environment. A batch in, JSON lines out.

mod cell;
mod codex;
mod engine;
pub mod init;
mod judge;
mod observe;
mod run;
pub mod witness;

pub(crate) use run::{environment_facts, run_batch};
