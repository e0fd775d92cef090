//! `matrix.toml`: its model, validation with file:line:col errors, expansion into cells.

mod axes;
mod check;
pub mod diag;
mod load;
pub mod model;
mod raw;
mod select;

pub use check::{LoadOptions, near_miss};
pub use diag::{Diagnostic, MatrixError};
pub use load::{load, load_str, load_str_with, load_with, parse_duration, parse_require};
pub use select::{Filter, selector_matches};
