//! One function per subcommand; each returns the process exit code (see [`crate::exit`]).
//!
//! Past 600 lines on purpose: the clap structs carry each subcommand's help text and examples
//! (half the file); every function is a short translation of arguments into calls.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::text::error_chain;

use crate::matrix::model::{Cell, Matrix};
use crate::matrix::{self, Filter};
use crate::{exit, progress};

#[derive(Args, Debug, Clone)]
#[command(
    about = "Run the matrix and write reports",
    long_about = "Expand the matrix, run every selected cell in batches (one batch per \
                  environment), and write junit.xml, report.md, results.json, results.jsonl and \
                  logs/ under the output directory. Cells whose backend is unavailable are \
                  SKIPped with the reason and the fix.",
    after_help = "Examples:\n  nsmatrix run\n  nsmatrix run --filter profile=seccomp-deny-userns --jobs 1\n  nsmatrix run --matrix my.toml --out reports/nightly --fail-fast\n  nsmatrix run --baseline reports/last-night --repeat 3\n  nsmatrix run --shard 2/3 --out reports/shard-2   # then: nsmatrix merge reports/shard-*"
)]
pub struct RunArgs {
    /// The matrix file.
    #[arg(long, default_value = "matrix.toml")]
    pub matrix: PathBuf,
    /// Select cells: an id glob (`host-*/bwrap-*/core/*`) or `axis=value` (value may be a
    /// glob). Repeat to narrow (all must match).
    #[arg(long = "filter", short = 'f')]
    pub filters: Vec<String>,
    /// Job slots (default: the number of cores). A process or a container takes one, a guest
    /// one per vCPU; guests also need their memory free.
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
    /// A previous run (directory or results.json): what changed goes at the top of report.md
    /// (and into diff.md, diff.json) and is outlined in the heat map.
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
    /// Run only shard K of N: whole batches (environments), balanced by estimated cost, the
    /// same partition on every machine. Combine the shards with `nsmatrix merge`.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<crate::shard::Shard>,
    /// Run every cell N times; cells whose status differs across repeats are reported as
    /// flaky and count with their worst repeat.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Backends whose cells must run, comma-separated (`host,docker,qemu`), or `none`:
    /// replaces the matrix's `[settings] require`. A SKIPped cell of a required backend is
    /// lost coverage: the run exits 4 naming it.
    #[arg(long, value_name = "BACKENDS")]
    pub require: Option<String>,
    /// An expect rule that matches no cell is a warning instead of an error.
    #[arg(long)]
    pub allow_unused_rules: bool,
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
    /// An expect rule that matches no cell is a warning instead of an error.
    #[arg(long)]
    pub allow_unused_rules: bool,
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "Show what this host offers: kernel, userns sysctls, bwrap, Docker, QEMU, KVM, cache",
    after_help = "Example:\n  nsmatrix doctor"
)]
pub struct DoctorArgs {}

/// Load the matrix and select cells; on bad input, print why and return the exit code.
fn load_cells(
    matrix: &Path,
    filters: &[String],
    opts: matrix::LoadOptions,
) -> Result<(Matrix, Vec<Cell>), u8> {
    let filter = Filter::parse(filters).map_err(|e| {
        eprintln!("nsmatrix: {e}");
        exit::BAD_INPUT
    })?;
    let m = matrix::load_with(matrix, opts).map_err(|e| {
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
    let opts = matrix::LoadOptions {
        allow_unused_rules: a.allow_unused_rules,
    };
    let (mut m, cells) = match load_cells(&a.matrix, &a.filters, opts) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if let Some(r) = &a.require {
        match parse_require_flag(r) {
            Ok(list) => m.settings.require = list,
            Err(e) => {
                eprintln!("nsmatrix: --require: {e}");
                return exit::BAD_INPUT;
            }
        }
    }
    let baseline = match a
        .baseline
        .as_deref()
        .map(crate::report::load::load)
        .transpose()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nsmatrix: --baseline: {}", error_chain(&e));
            return exit::BAD_INPUT;
        }
    };
    let total_cells = cells.len();
    let groups = crate::plan::group(cells);
    let groups = match a.shard {
        Some(sh) => sh.select(groups),
        None => groups,
    };
    let run_name = crate::report::run_name_now();
    let out_dir = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("reports").join(&run_name));
    let opts = crate::run::RunOptions {
        jobs: a.jobs.unwrap_or_else(default_jobs),
        fail_fast: a.fail_fast,
        mode: progress::detect_mode(a.quiet),
        out_dir: out_dir.clone(),
        run_name,
        repeat: a.repeat,
    };
    let Some(rt) = crate::run::runtime() else {
        return exit::ERRORS;
    };
    let mut results = match rt.block_on(crate::run::run(&m, groups, &opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nsmatrix: {e:#}");
            return exit::ERRORS;
        }
    };
    results.shard = a.shard.map(|sh| crate::report::model::ShardInfo {
        index: sh.index,
        count: sh.count,
        total_cells,
    });
    let diff = baseline
        .as_ref()
        .map(|b| crate::report::diff::diff(b, &results, Default::default()));
    if let Err(e) = crate::report::write_all_with(&results, &out_dir, diff.as_ref()) {
        eprintln!("nsmatrix: {e:#}");
        return exit::ERRORS;
    }
    let summary = results.summary_line();
    println!(
        "nsmatrix: {} cells in {:.1} s: {}",
        results.cells.len(),
        results.duration_ms as f64 / 1000.0,
        summary
    );
    println!(
        "nsmatrix: reports in {}/ (report.md, heatmap.svg, timeline.svg, junit.xml, results.json, results.jsonl, logs/)",
        out_dir.display()
    );
    if let Some(d) = &diff {
        println!(
            "nsmatrix: against the baseline {}: {} regressed, {} fixed, {} changed signature, {} timing regressions (diff.md)",
            d.base.run_name,
            d.regressions.len(),
            d.fixes.len(),
            d.signature_changes.len(),
            d.timing.regressions.len()
        );
    }
    let lost = crate::report::coverage::lost_line(&results);
    if !lost.is_empty() {
        eprintln!(
            "nsmatrix: {lost} (exit {}; relax with --require or [settings] require)",
            exit::COVERAGE_LOST
        );
    }
    let code = results.exit_code();
    if results.interrupted.is_some() && code == exit::OK {
        exit::ERRORS
    } else {
        code
    }
}

/// `--require host,docker` → the backends; `none` (or empty) → none.
fn parse_require_flag(s: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "none" {
            continue;
        }
        let b = crate::matrix::parse_require(part)?;
        if !out.contains(&b) {
            out.push(b);
        }
    }
    Ok(out)
}

fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// `nsmatrix list`.
pub fn list(a: ListArgs) -> u8 {
    let opts = matrix::LoadOptions {
        allow_unused_rules: a.allow_unused_rules,
    };
    let (m, cells) = match load_cells(&a.matrix, &a.filters, opts) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let Some(rt) = crate::run::runtime() else {
        return exit::ERRORS;
    };
    let mut kinds: Vec<_> = cells.iter().map(|c| c.env.backend()).collect();
    kinds.sort();
    kinds.dedup();
    let backends = rt.block_on(crate::backend::Registry::probe(&kinds, &m.settings));
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for c in &cells {
        let expect = match &c.expect {
            crate::matrix::model::Expectation::Pass => "expect pass".to_string(),
            crate::matrix::model::Expectation::Fail { signature, .. } => {
                format!("expect fail {signature}")
            }
        };
        let line = match c
            .skip
            .clone()
            .or_else(|| backends.unavailable(c.env.backend()).map(|u| u.to_string()))
        {
            Some(reason) => writeln!(out, "{}\t{expect}\tSKIP: {reason}", c.id),
            None => writeln!(out, "{}\t{expect}", c.id),
        };
        // A closed pipe (`nsmatrix list | head`) ends the listing quietly.
        if line.is_err() {
            return exit::OK;
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
    let Some(rt) = crate::run::runtime() else {
        return exit::ERRORS;
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
/// `nsmatrix agent --batch FILE [--unpack-stdin DIR]`: run one batch, JSON lines on stdout.
pub fn agent(batch: &Path, unpack_stdin: Option<&Path>) -> u8 {
    if let Some(dir) = unpack_stdin {
        let mut a = tar::Archive::new(std::io::stdin().lock());
        a.set_preserve_permissions(true);
        if let Err(e) = a.unpack(dir) {
            eprintln!(
                "nsmatrix agent: failed to unpack the batch's files from stdin into {}: {e}",
                dir.display()
            );
            return crate::exit::ERRORS;
        }
    }
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

fn read_batch(path: &Path) -> anyhow::Result<crate::protocol::BatchSpec> {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Markdown,
    Json,
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "What changed between two runs: regressions, fixes, signatures, timing, cells added/removed",
    long_about = "Pair the cells of two runs by id. Regressions: PASS/XFAIL before, FAIL/XPASS/ERROR \
                  now. Fixes: the reverse. Signature changes: failed in both, for another reason. \
                  Timing: per environment × subject, the median cell time against the \
                  baseline's, beyond a noise band. Lost coverage: PASS/XFAIL before, SKIPped or \
                  missing now. Exit code 1 when anything regressed (timing too, unless \
                  --ignore-timing), else 4 when coverage was lost, else 0; 2 on unreadable \
                  input.",
    after_help = "Examples:\n  nsmatrix diff reports/last-night reports/tonight\n  nsmatrix diff old/results.json new/results.json --format json > diff.json"
)]
pub struct DiffArgs {
    /// The baseline run (directory or results.json).
    pub base: PathBuf,
    /// The new run (directory or results.json).
    pub new: PathBuf,
    #[arg(long, value_enum, default_value = "markdown")]
    pub format: Format,
    /// Timing: a group's median must grow by more than this percentage of the baseline's...
    #[arg(long, default_value_t = 50.0, value_name = "PCT")]
    pub time_threshold: f64,
    /// ...and by more than this many milliseconds.
    #[arg(long, default_value_t = 25, value_name = "MS")]
    pub time_floor_ms: u64,
    /// Report timing regressions but do not let them set the exit code.
    #[arg(long)]
    pub ignore_timing: bool,
}

/// `nsmatrix diff`.
pub fn diff(a: DiffArgs) -> u8 {
    let load = |p: &Path| {
        crate::report::load::load(p).map_err(|e| {
            eprintln!("nsmatrix diff: {}", error_chain(&e));
            exit::BAD_INPUT
        })
    };
    let (base, new) = match (load(&a.base), load(&a.new)) {
        (Ok(b), Ok(n)) => (b, n),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let d = crate::report::diff::diff(
        &base,
        &new,
        crate::report::diff::DiffOptions {
            time_threshold_pct: a.time_threshold,
            time_floor_ms: a.time_floor_ms,
        },
    );
    match a.format {
        Format::Markdown => print!("{}", d.render_markdown()),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&d).expect("diff serialises")
        ),
    }
    d.exit_code(!a.ignore_timing)
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "Release sign-off: pair the cells that differ only in one axis and give a verdict",
    long_about = "Within one run, pair every cell whose AXIS is FROM with its twin whose AXIS is TO \
                  and every other axis equal, and sort the pairs by what was observed: fixed, \
                  broken, unchanged-pass, unchanged-fail (with the signatures of what still \
                  fails, and where), inconclusive (ERROR/SKIP). Verdict: DO NOT SHIP when any \
                  pair broke (exit 1), NO VERDICT naming the lost coverage when the sides do \
                  not cover the same cells (a SKIPped side, a cell without a twin; exit 4), NO \
                  VERDICT when a pair ended in ERROR (exit 3), else SHIP (exit 0). Bad input \
                  exits 2.",
    after_help = "Examples:\n  nsmatrix signoff --axis image --from bookworm --to bookworm-suid reports/nightly\n  nsmatrix signoff --axis setuid --from false --to true --format json\n  nsmatrix signoff --axis image --from bookworm --to bookworm-suid --filter kernel=synology-like-5.10"
)]
pub struct SignoffArgs {
    /// The axis that differs (`image`, `profile`, `setuid`, `kernel`, ...).
    #[arg(long)]
    pub axis: String,
    /// The value being replaced.
    #[arg(long)]
    pub from: String,
    /// The candidate value.
    #[arg(long)]
    pub to: String,
    /// Pair only cells that match: `axis=value` (value may be a glob) or an id glob, as in
    /// `run --filter`. Repeat to narrow (all must match).
    #[arg(short = 'f', long = "filter")]
    pub filters: Vec<String>,
    /// The run (directory or results.json); default: the newest run under reports/.
    pub run: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "markdown")]
    pub format: Format,
}

/// The newest run directory under `reports/` (by name: run names sort by time).
fn newest_run() -> Option<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir("reports")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("results.json").is_file())
        .collect();
    runs.sort_by_key(|p| {
        std::fs::metadata(p.join("results.json"))
            .and_then(|m| m.modified())
            .ok()
    });
    runs.pop()
}

/// `nsmatrix signoff`.
pub fn signoff(a: SignoffArgs) -> u8 {
    let Some(path) = a.run.clone().or_else(newest_run) else {
        eprintln!(
            "nsmatrix signoff: no run given and none under reports/: run `nsmatrix run` first or name a run directory"
        );
        return exit::BAD_INPUT;
    };
    let mut run = match crate::report::load::load(&path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nsmatrix signoff: {}", error_chain(&e));
            return exit::BAD_INPUT;
        }
    };
    if !a.filters.is_empty() {
        let filter = match Filter::parse(&a.filters) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("nsmatrix signoff: {e}");
                return exit::BAD_INPUT;
            }
        };
        run.cells.retain(|c| filter.matches_axes(&c.id, &c.axes));
        if run.cells.is_empty() {
            eprintln!(
                "nsmatrix signoff: no cell of {} matches --filter {} (see `nsmatrix list` for the axes)",
                path.display(),
                a.filters.join(" --filter ")
            );
            return exit::BAD_INPUT;
        }
    }
    let s = match crate::report::signoff::signoff(&run, &a.axis, &a.from, &a.to) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nsmatrix signoff: {} ({})", error_chain(&e), path.display());
            return exit::BAD_INPUT;
        }
    };
    match a.format {
        Format::Markdown => print!("{}", s.render_markdown()),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&s).expect("signoff serialises")
        ),
    }
    s.exit_code()
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "Combine the outputs of `run --shard K/N` into one set of reports",
    long_about = "Read the results.json of every shard, check that they are the N shards of one \
                  run (none missing, none twice, no cell twice), and write results.json, \
                  results.jsonl, junit.xml, report.md and heatmap.svg for the whole matrix, in the \
                  matrix's order, as an unsharded run would; logs/ of the shards are copied. \
                  The exit code is the merged run's (0, 1 or 3); 2 on bad input.",
    after_help = "Examples:\n  nsmatrix merge reports/shard-1 reports/shard-2 reports/shard-3 --out reports/nightly\n  nsmatrix merge shards/*/ --out reports/nightly --baseline reports/last-night"
)]
pub struct MergeArgs {
    /// The shards' run directories (or results.json files).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where the merged reports go.
    #[arg(long)]
    pub out: PathBuf,
    /// The merged run's name (default: the first shard's).
    #[arg(long)]
    pub name: Option<String>,
    /// A previous run to compare with, as for `run --baseline`.
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
}

/// `nsmatrix merge`.
pub fn merge(a: MergeArgs) -> u8 {
    let mut inputs = Vec::new();
    for p in &a.runs {
        match crate::report::load::load(p) {
            Ok(r) => inputs.push((p.clone(), r)),
            Err(e) => {
                eprintln!("nsmatrix merge: {}", error_chain(&e));
                return exit::BAD_INPUT;
            }
        }
    }
    let baseline = match a
        .baseline
        .as_deref()
        .map(crate::report::load::load)
        .transpose()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nsmatrix merge: --baseline: {}", error_chain(&e));
            return exit::BAD_INPUT;
        }
    };
    let merged = match crate::report::merge::merge(inputs, a.name.clone()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("nsmatrix merge: {}", error_chain(&e));
            return exit::BAD_INPUT;
        }
    };
    let diff = baseline
        .as_ref()
        .map(|b| crate::report::diff::diff(b, &merged, Default::default()));
    let written = crate::report::write_all_with(&merged, &a.out, diff.as_ref())
        .and_then(|()| write_jsonl(&merged, &a.out))
        .and_then(|()| copy_logs(&a.runs, &a.out));
    if let Err(e) = written {
        eprintln!("nsmatrix merge: {e:#}");
        return exit::ERRORS;
    }
    let summary = merged.summary_line();
    println!(
        "nsmatrix merge: {} runs, {} cells: {}; reports in {}/",
        a.runs.len(),
        merged.cells.len(),
        summary,
        a.out.display()
    );
    merged.exit_code()
}

fn write_jsonl(run: &crate::report::RunResults, dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut s = String::new();
    for c in &run.cells {
        s.push_str(&serde_json::to_string(c).expect("results serialise"));
        s.push('\n');
    }
    let p = dir.join("results.jsonl");
    std::fs::write(&p, s).with_context(|| format!("failed to write {}", p.display()))
}

/// Copy each shard's `logs/<batch>/` into `out/logs/` (batches never repeat across shards).
fn copy_logs(runs: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            let dest = to.join(e.file_name());
            if e.file_type()?.is_dir() {
                copy_dir(&e.path(), &dest)?;
            } else {
                std::fs::copy(e.path(), dest)?;
            }
        }
        Ok(())
    }
    for r in runs {
        let dir = if r.is_dir() {
            r.clone()
        } else {
            r.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        let logs = dir.join("logs");
        if logs.is_dir() && logs != out.join("logs") {
            copy_dir(&logs, &out.join("logs")).with_context(|| {
                format!("failed to copy {} into {}", logs.display(), out.display())
            })?;
        }
    }
    Ok(())
}
