//! Exit codes, from one table; `report::for_statuses` maps a run's statuses onto them.

/// Every cell met its expectation.
pub const OK: u8 = 0;
/// Some cell FAILed or XPASSed.
pub const FAILURES: u8 = 1;
/// Bad input (matrix, scenario, arguments); nothing run.
pub const BAD_INPUT: u8 = 2;
/// No unexpected failure, but some cells ended in ERROR.
pub const ERRORS: u8 = 3;
/// No unexpected failure, but coverage was lost: a cell of a required backend was SKIPped
/// (`[settings] require`, `run --require`), `diff` found cells that ran before and no longer
/// do, or `signoff` found sides that do not cover the same cells.
pub const COVERAGE_LOST: u8 = 4;
