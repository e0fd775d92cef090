//! `matrix.toml`: its model, validation with file:line:col errors, expansion into cells.

pub mod model;
