//! One function per subcommand; each returns the process exit code (see [`crate::exit`]).

use std::path::{Path, PathBuf};

use clap::Args;

#[derive(Args, Debug, Clone)]
#[command(
    about = "Run the matrix and write reports",
    long_about = "Expand the matrix, run every selected cell in batches (one batch per \
                  environment), and write junit.xml, report.md, results.json, results.jsonl and \
                  logs/ under the output directory. Cells whose backend is unavailable are \
                  SKIPped with the reason and the fix.",
    after_help = "Examples:\n  nsmatrix run\n  nsmatrix run --filter profile=seccomp-deny-userns --jobs 1\n  nsmatrix run --matrix my.toml --out reports/nightly --fail-fast"
)]
pub struct RunArgs {
    /// The matrix file.
    #[arg(long, default_value = "matrix.toml")]
    pub matrix: PathBuf,
    /// Select cells: an id glob (`host-*/bwrap-*/core/*`) or `axis=value` (value may be a
    /// glob). Repeat to narrow (all must match).
    #[arg(long = "filter", short = 'f')]
    pub filters: Vec<String>,
    /// Batches run at once (a QEMU guest counts more than a container).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Output directory (default: reports/<run name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop starting new work after the first unexpected failure.
    #[arg(long)]
    pub fail_fast: bool,
    /// One plain line per cell, no progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "List the expanded cells, one stable id per line",
    after_help = "Examples:\n  nsmatrix list\n  nsmatrix list --filter backend=host --filter setuid=true"
)]
pub struct ListArgs {
    #[arg(long, default_value = "matrix.toml")]
    pub matrix: PathBuf,
    #[arg(long = "filter", short = 'f')]
    pub filters: Vec<String>,
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "Show what this host offers: kernel, userns sysctls, bwrap, Docker, QEMU, KVM, cache",
    after_help = "Example:\n  nsmatrix doctor"
)]
pub struct DoctorArgs {}

pub fn run(_a: RunArgs) -> u8 {
    unimplemented!()
}
pub fn list(_a: ListArgs) -> u8 {
    unimplemented!()
}
pub fn doctor(_a: DoctorArgs) -> u8 {
    unimplemented!()
}
pub fn agent(_batch: &Path) -> u8 {
    unimplemented!()
}
