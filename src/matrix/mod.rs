//! `matrix.toml`: its model, validation with file:line:col errors, expansion into cells.

mod axes;
pub(crate) mod diag;
mod load;
pub mod model;
mod raw;
mod select;

pub(crate) use load::load;
pub(crate) use select::Filter;
