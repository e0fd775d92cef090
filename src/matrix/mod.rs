//! `matrix.toml`: its model, validation with file:line:col errors, expansion into cells.

pub mod diag;
mod load;
pub mod model;
mod raw;

pub use diag::{Diagnostic, MatrixError};
pub use load::{Filter, load, load_str, parse_duration, selector_matches};
