//! `matrix.toml`: its model, validation with file:line:col errors, expansion into cells.

mod axes;
mod check;
mod codex_versions;
pub(crate) mod diag;
mod load;
pub mod model;
mod raw;
mod select;

pub(crate) use load::load;
#[cfg(test)]
pub(crate) use load::load_str;

/// The `[profile.NAME]`s of a matrix file (tests and benchmarks take their profiles from
/// `matrix.toml` itself, never from a copy).
pub fn profiles(path: &std::path::Path) -> anyhow::Result<Vec<model::Profile>> {
    load::load_profiles(path)
}
pub(crate) use check::LoadOptions;
pub(crate) use load::{load_with, parse_require};
pub(crate) use select::Filter;
