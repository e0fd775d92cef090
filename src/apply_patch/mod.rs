//! A Codex-compatible `apply_patch`: [`run_cli`] is the command (argv[1] or stdin, applied
//! under the current directory), [`parse`] the `*** Begin Patch` grammar and [`apply_hunks`]
//! the file operations, each matching Codex CLI 0.171's results, messages and exit codes.

mod apply;
mod cli;
mod parser;
mod seek;

pub use apply::{Affected, ApplyError, apply_hunks};
pub use cli::{EXIT_FAILURE, EXIT_OK, EXIT_USAGE, apply_patch_text, run_cli};
pub use parser::{Chunk, Hunk, ParseError, parse};
