//! Backends start an environment, place the agent and the scenarios, run `nsmatrix agent` on a
//! batch, stream its events back and clean up. They know nothing of scenarios' content.

pub mod docker;
mod events;
pub mod host;
pub mod qemu;

pub use events::{BackendEvent, BatchCtx, BatchError, Stage, Unavailable};
