//! One function per subcommand; each returns the process exit code (see [`crate::exit`]).

use std::path::{Path, PathBuf};

use clap::Args;

use crate::matrix::model::{Cell, Matrix};
use crate::matrix::{self, Filter};
use crate::{exit, progress, schedule};

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

/// Load the matrix and select cells; on bad input, print why and return the exit code.
fn load_cells(matrix: &Path, filters: &[String]) -> Result<(Matrix, Vec<Cell>), u8> {
    let filter = Filter::parse(filters).map_err(|e| {
        eprintln!("nsmatrix: {e}");
        exit::BAD_INPUT
    })?;
    let m = matrix::load(matrix).map_err(|e| {
        eprintln!("{e}");
        exit::BAD_INPUT
    })?;
    let cells: Vec<Cell> = m
        .cells
        .iter()
        .filter(|c| filter.matches(c))
        .cloned()
        .collect();
    if cells.is_empty() {
        eprintln!(
            "nsmatrix: no cell of {} matches the filters {filters:?}",
            matrix.display()
        );
        return Err(exit::BAD_INPUT);
    }
    Ok((m, cells))
}

/// `nsmatrix run`.
pub fn run(a: RunArgs) -> u8 {
    let (m, cells) = match load_cells(&a.matrix, &a.filters) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let run_name = crate::report::run_name_now();
    let out_dir = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("reports").join(&run_name));
    let opts = schedule::RunOptions {
        jobs: a.jobs.unwrap_or_else(default_jobs),
        fail_fast: a.fail_fast,
        mode: progress::detect_mode(a.quiet),
        out_dir: out_dir.clone(),
        run_name,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nsmatrix: failed to start the runtime: {e}");
            return exit::ERRORS;
        }
    };
    let results = match rt.block_on(schedule::run(&m, cells, &opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nsmatrix: {e:#}");
            return exit::ERRORS;
        }
    };
    if let Err(e) = crate::report::write_all(&results, &out_dir) {
        eprintln!("nsmatrix: {e:#}");
        return exit::ERRORS;
    }
    let counts = results.counts();
    let summary: Vec<String> = crate::report::Status::ALL
        .iter()
        .map(|s| format!("{} {}", counts.get(s).copied().unwrap_or(0), s.as_str()))
        .collect();
    println!(
        "nsmatrix: {} cells in {:.1} s: {}",
        results.cells.len(),
        results.duration_ms as f64 / 1000.0,
        summary.join(", ")
    );
    println!(
        "nsmatrix: reports in {}/ (report.md, junit.xml, results.json, results.jsonl, logs/)",
        out_dir.display()
    );
    let code = results.exit_code();
    if results.interrupted.is_some() && code == exit::OK {
        exit::ERRORS
    } else {
        code
    }
}

fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// `nsmatrix list`.
pub fn list(a: ListArgs) -> u8 {
    let (m, cells) = match load_cells(&a.matrix, &a.filters) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let backends = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(schedule::Backends::probe(&m, &cells)),
        Err(e) => {
            eprintln!("nsmatrix: failed to start the runtime: {e}");
            return exit::ERRORS;
        }
    };
    for c in &cells {
        let expect = match &c.expect {
            crate::matrix::model::Expectation::Pass => "expect pass".to_string(),
            crate::matrix::model::Expectation::Fail { signature, .. } => {
                format!("expect fail {signature}")
            }
        };
        match c
            .skip
            .clone()
            .or_else(|| backends.unavailable(c.env.backend).map(|u| u.to_string()))
        {
            Some(reason) => println!("{}\t{expect}\tSKIP: {reason}", c.id),
            None => println!("{}\t{expect}", c.id),
        }
    }
    eprintln!("{} cells ({} in the matrix)", cells.len(), m.cells.len());
    exit::OK
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "Build, list or prune the Docker images nsmatrix makes without a registry",
    long_about = "Images are built from vm-images/: a Debian root filesystem made with debootstrap \
                  (cached under the cache directory), imported into the engine, then the \
                  Dockerfiles of vm-images/docker/ on top. Each image is tagged with a hash of \
                  its recipe and rebuilt only when the recipe changes. `run` builds what it \
                  needs by itself; this command does it ahead of time.",
    after_help = "Examples:\n  nsmatrix images build\n  nsmatrix images build bookworm-suid --force\n  nsmatrix images list\n  nsmatrix images prune"
)]
pub struct ImagesArgs {
    #[command(subcommand)]
    pub action: ImagesAction,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ImagesAction {
    /// Build the named catalog images (all when none is named).
    Build {
        names: Vec<String>,
        /// Rebuild even when an image of the same recipe exists.
        #[arg(long)]
        force: bool,
    },
    /// Show the images nsmatrix made and whether each matches its current recipe.
    List,
    /// Remove images whose recipe changed (all of nsmatrix's images with --all).
    Prune {
        #[arg(long)]
        all: bool,
    },
}

/// `nsmatrix images`.
pub fn images(a: ImagesArgs) -> u8 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nsmatrix: failed to start the runtime: {e}");
            return exit::ERRORS;
        }
    };
    rt.block_on(async {
        let d = match crate::backend::docker::connect().await {
            Ok(d) => d,
            Err(u) => {
                eprintln!("nsmatrix images: {u}");
                return exit::ERRORS;
            }
        };
        let r = match a.action {
            ImagesAction::Build { names, force } => {
                let mut say = |l: &str| println!("{l}");
                d.build_images(&names, force, &mut say).await.map(|tags| {
                    for t in tags {
                        println!("built {t}");
                    }
                })
            }
            ImagesAction::List => d.list_images().await.map(|list| {
                for i in list {
                    println!(
                        "{:<16} {:<40} {:>8.1} MB  {}",
                        i.name,
                        i.tag,
                        i.size_bytes as f64 / 1e6,
                        if i.current {
                            "current"
                        } else {
                            "stale (recipe changed)"
                        }
                    );
                }
            }),
            ImagesAction::Prune { all } => d.prune_images(all).await.map(|removed| {
                for r in &removed {
                    println!("removed {r}");
                }
                println!("{} image(s) removed", removed.len());
            }),
        };
        match r {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("nsmatrix images: {e:#}");
                exit::ERRORS
            }
        }
    })
}

/// `nsmatrix doctor`.
pub fn doctor(_a: DoctorArgs) -> u8 {
    for (k, v) in crate::doctor::report() {
        println!("{k:<45} {v}");
    }
    exit::OK
}
/// `nsmatrix agent --batch FILE`: run one batch, JSON lines on stdout.
pub fn agent(batch: &Path) -> u8 {
    let spec = match read_batch(batch) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nsmatrix agent: {e:#}");
            return crate::exit::BAD_INPUT;
        }
    };
    let mut out = std::io::stdout().lock();
    match crate::agent::run_batch(&spec, &mut out) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("nsmatrix agent: {e:#}");
            crate::exit::ERRORS
        }
    }
}

fn read_batch(path: &Path) -> anyhow::Result<crate::agent::protocol::BatchSpec> {
    use anyhow::Context;
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("failed to read {}", path.display()))?
    };
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid batch spec", path.display()))
}
