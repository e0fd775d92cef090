//! Exit codes, from one table (ARCHITECTURE.md), mapped in one function.

use crate::report::Status;

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

/// The exit code of a run from its cells' statuses and whether a requirement was broken:
/// FAIL/XPASS (1) before lost coverage (4) before ERROR (3).
pub fn for_run<'a>(statuses: impl IntoIterator<Item = &'a Status>, coverage_lost: bool) -> u8 {
    match for_statuses(statuses) {
        FAILURES => FAILURES,
        _ if coverage_lost => COVERAGE_LOST,
        code => code,
    }
}

/// The exit code of a run from its cells' statuses.
pub fn for_statuses<'a>(statuses: impl IntoIterator<Item = &'a Status>) -> u8 {
    let mut code = OK;
    for s in statuses {
        match s {
            Status::Fail | Status::Xpass => return FAILURES,
            Status::Error => code = ERRORS,
            Status::Pass | Status::Xfail | Status::Skip => {}
        }
    }
    code
}
