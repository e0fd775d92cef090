//! A Codex-compatible `apply_patch`: parse the `*** Begin Patch` format and apply it under a
//! root. (Being written.)

use std::ffi::OsString;
use std::io::{Read, Write};

/// The `apply_patch` command line: `args` excludes argv[0]. Returns the exit code
/// (0 ok, 1 failure, 2 usage), writing what Codex's writes to `stdout`/`stderr`.
pub fn run_cli(
    _args: &[OsString],
    _stdin: &mut dyn Read,
    _stdout: &mut dyn Write,
    _stderr: &mut dyn Write,
) -> i32 {
    unimplemented!("apply_patch::run_cli")
}
