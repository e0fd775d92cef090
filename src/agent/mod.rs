//! The agent: what runs inside an environment. A batch in, JSON lines out.

mod codex;
pub mod init;
mod judge;
mod observe;
pub mod protocol;
mod run;
pub mod witness;

pub use run::{environment_facts, run_batch, tail};
