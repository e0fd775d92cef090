//! nsmatrix: on which kernels, container setups and bubblewrap builds does a sandbox work?
//!
//! `matrix` expands `matrix.toml` into cells, `schedule` runs them in batches on a `backend`,
//! where `agent` runs each cell's `scenario` through a `sandbox` with our `apply_patch`, and
//! `report` turns the results into JUnit, Markdown and JSON.

pub mod agent;
pub mod apply_patch;
pub mod artifacts;
pub mod backend;
pub mod cli;
pub mod cli_engine;
pub mod cli_vm;
pub mod doctor;
pub mod exit;
pub mod guest_engine;
pub mod matrix;
pub mod progress;
pub mod report;
pub mod sandbox;
pub mod scenario;
pub mod schedule;
pub mod shard;
