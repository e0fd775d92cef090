//! [`run_cli`]: the `apply_patch` command line, with Codex's messages and exit codes.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;

use super::apply::apply_hunks;
use super::parser::parse;

const USAGE: &str = "Usage: apply_patch 'PATCH'\n       echo 'PATCH' | apply_patch\n";

/// Exit codes, as Codex's `apply_patch` uses them.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// The `apply_patch` command line: `args` excludes argv[0]. The patch is `args[0]`, or stdin
/// when there is no argument; it is applied under the current directory. Returns the exit
/// code (0 ok, 1 failure, 2 usage), having written what Codex's writes to `stdout`/`stderr`.
pub fn run_cli(
    args: &[OsString],
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> i32 {
    let patch = match args {
        [] => {
            let mut buf = Vec::new();
            let text = stdin
                .read_to_end(&mut buf)
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    String::from_utf8(buf).map_err(|_| "stream did not contain valid UTF-8".into())
                });
            match text {
                Ok(t) if t.is_empty() => {
                    let _ = stderr.write_all(USAGE.as_bytes());
                    return EXIT_USAGE;
                }
                Ok(t) => t,
                Err(e) => {
                    let _ = writeln!(stderr, "Error: Failed to read PATCH from stdin.\n{e}");
                    return EXIT_FAILURE;
                }
            }
        }
        [one] => match one.to_str() {
            Some(s) => s.to_string(),
            None => {
                let _ = writeln!(
                    stderr,
                    "Error: apply_patch requires a UTF-8 PATCH argument."
                );
                return EXIT_FAILURE;
            }
        },
        _ => {
            let _ = writeln!(stderr, "Error: apply_patch accepts exactly one argument.");
            return EXIT_USAGE;
        }
    };
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(
                stderr,
                "Error: failed to determine the current directory: {e}"
            );
            return EXIT_FAILURE;
        }
    };
    apply_patch_text(&patch, &cwd, stdout, stderr)
}

/// Parse `patch` and apply it under `cwd` (relative paths resolve against it; error messages
/// name `cwd`-joined paths, as Codex's do). Returns the exit code: 0 or 1.
pub fn apply_patch_text(
    patch: &str,
    cwd: &Path,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> i32 {
    let hunks = match parse(patch) {
        Ok(h) => h,
        Err(e) => {
            let _ = writeln!(stderr, "{e}");
            return EXIT_FAILURE;
        }
    };
    match apply_hunks(&hunks, cwd) {
        Ok(done) => {
            let _ = stdout.write_all(done.summary().as_bytes());
            let _ = stdout.flush();
            EXIT_OK
        }
        Err(e) => {
            let _ = writeln!(stderr, "{e}");
            EXIT_FAILURE
        }
    }
}
