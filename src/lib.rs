//! nsmatrix: on which kernels, container setups and bubblewrap builds does a sandbox work?
//!
//! `matrix` expands `matrix.toml` into cells, `plan` groups them into batches on a `backend`,
//! `schedule` dispatches the batches, where `agent` runs each cell's `scenario` through a
//! `sandbox` with our `apply_patch` (speaking `protocol`), and `report` turns the results into
//! JUnit, Markdown and JSON. `run` ties one run together.

pub mod agent;
pub mod apply_patch;
pub mod artifacts;
pub mod backend;
pub mod cli;
pub mod cli_engine;
pub mod cli_signoff_image;
pub mod cli_vm;
pub(crate) mod doctor;
pub(crate) mod exit;
pub mod matrix;
pub(crate) mod plan;
pub(crate) mod progress;
pub mod protocol;
pub(crate) mod record;
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod sandbox;
pub mod scenario;
pub(crate) mod schedule;
pub mod shard;
pub(crate) mod text;

#[cfg(test)]
mod snapshots;
