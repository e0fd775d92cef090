//! One run: plan the cells, dispatch the plan's batches, and assemble every result in the
//! matrix's order. `results.jsonl` gets each result the moment it is known.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::backend::Registry;
use crate::matrix::model::Matrix;
use crate::plan::{Group, PlanOptions};
use crate::progress::{Mode, Progress};
use crate::protocol::Outcome;
use crate::record::Recorder;
use crate::report::model::{RunResults, SCHEMA_VERSION, not_run};
use crate::schedule::DispatchOptions;

/// How long a second Ctrl-C waits for the backends to remove what the run created.
const ABORT_CLEANUP: Duration = Duration::from_secs(60);

pub(crate) struct RunOptions {
    pub jobs: usize,
    pub fail_fast: bool,
    pub mode: Mode,
    pub out_dir: PathBuf,
    pub run_name: String,
    /// Run every batch this many times (`--repeat N`); 1 = once.
    pub repeat: u32,
}

/// Run `groups` (selected cells by environment) and return every result (reports are written
/// by the caller).
pub(crate) async fn run(
    matrix: &Matrix,
    groups: Vec<Group>,
    opts: &RunOptions,
) -> Result<RunResults> {
    let started = Instant::now();
    let started_at = crate::report::timestamp_utc();
    std::fs::create_dir_all(opts.out_dir.join("logs"))
        .with_context(|| format!("failed to create {}", opts.out_dir.display()))?;
    let jsonl_path = opts.out_dir.join("results.jsonl");
    let jsonl = std::fs::File::create(&jsonl_path)
        .with_context(|| format!("failed to create {}", jsonl_path.display()))?;
    let registry = Registry::probe(&crate::plan::kinds(&groups), &matrix.settings).await;
    let run_id = format!("{}-{}", opts.run_name, std::process::id());
    let agent_bin = std::env::current_exe().context("failed to find the nsmatrix binary")?;

    let repeat = opts.repeat.max(1);
    let total: usize = groups.iter().map(|g| g.cells.len()).sum();
    let mut rec = Recorder::new(jsonl, Progress::new(opts.mode, total * repeat as usize));
    let plan_opts = PlanOptions {
        run_id: &run_id,
        agent_bin,
        cell_timeout: matrix.settings.cell_timeout,
    };
    let plan = {
        let progress = &mut rec.progress;
        crate::plan::prepare(&registry, groups, &plan_opts, &mut |l| progress.println(l)).await
    };
    // Cells that cannot run here: SKIP with the reason and the fix.
    for (cell, reason) in &plan.skipped {
        let r = not_run(
            cell,
            Outcome::Skipped {
                reason: reason.clone(),
            },
            0,
        );
        rec.record(r)?;
    }
    for b in &plan.backends {
        b.begin_run(&run_id)
            .await
            .with_context(|| format!("failed to prepare the {} backend", b.kind().as_str()))?;
    }

    let dispatch = DispatchOptions {
        jobs: opts.jobs,
        fail_fast: opts.fail_fast,
        repeat,
        log_root: opts.out_dir.join("logs"),
        memory_mb: crate::schedule::memory_budget_mb(),
        run_started: started,
    };
    let dispatched =
        crate::schedule::dispatch(&plan, &run_id, &matrix.settings, &dispatch, &mut rec).await?;
    rec.progress.finish();
    for b in &plan.backends {
        let end = b.end_run(&run_id, dispatched.aborted);
        if dispatched.aborted {
            if tokio::time::timeout(ABORT_CLEANUP, end).await.is_err() {
                eprintln!(
                    "nsmatrix: the {} backend did not finish removing this run's leftovers within {ABORT_CLEANUP:?}",
                    b.kind().as_str()
                );
            }
        } else {
            end.await;
        }
    }

    // One cell per id (repeats folded), in the matrix's order: never the order batches
    // happened to finish in, so shards merge into exactly an unsharded run's results.
    let ordinals: HashMap<&str, usize> = matrix
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let mut results = rec.results;
    for r in &mut results {
        r.ordinal = ordinals.get(r.id.as_str()).copied().unwrap_or(usize::MAX);
    }
    let mut results = crate::report::model::fold_repeats(results);
    results.sort_by(|a, b| a.ordinal.cmp(&b.ordinal).then_with(|| a.id.cmp(&b.id)));
    Ok(RunResults {
        schema_version: SCHEMA_VERSION,
        run_name: opts.run_name.clone(),
        matrix: matrix.path.display().to_string(),
        started: started_at,
        duration_ms: started.elapsed().as_millis() as u64,
        interrupted: dispatched.interrupted,
        host: crate::agent::environment_facts(),
        batches: dispatched.batches,
        cells: results,
        shard: None,
        repeat,
        require: matrix.settings.require.clone(),
        timeline: Some(dispatched.timeline),
    })
}

/// The tokio runtime of every subcommand that needs one; on failure it says why and returns
/// `None`.
pub(crate) fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("nsmatrix: failed to start the runtime: {e}");
            None
        }
    }
}
