//! The scheduler: cells → batches (one per environment) → backends, with bounded
//! concurrency, timeouts, retries of ERROR only, fail-fast, Ctrl-C, and one dispatcher that
//! judges every result, appends it to `results.jsonl` at once and feeds the progress display.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::agent::protocol::{
    AgentEvent, BatchSpec, CellRecord, CellSpec, Outcome, PROTOCOL_VERSION,
};
use crate::backend::docker::DockerBackend;
use crate::backend::host::HostBackend;
use crate::backend::qemu::QemuBackend;
use crate::backend::{BackendEvent, BatchCtx, BatchError, Unavailable};
use crate::matrix::model::{BackendKind, Cell, Environment, Matrix};
use crate::progress::{Mode, Progress};
use crate::report::model::{BatchInfo, CellResult, RunResults, SCHEMA_VERSION, judge, not_run};

pub struct RunOptions {
    pub jobs: usize,
    pub fail_fast: bool,
    pub mode: Mode,
    pub out_dir: PathBuf,
    pub run_name: String,
    /// Run every batch this many times (`--repeat N`); 1 = once.
    pub repeat: u32,
}

/// The backends of this run, probed once.
pub struct Backends {
    host: Result<Arc<HostBackend>, Unavailable>,
    docker: Result<DockerBackend, Unavailable>,
    qemu: Result<QemuBackend, Unavailable>,
}

impl Backends {
    /// Probe only the backends the cells use (no Docker connection for a host-only run).
    pub async fn probe(matrix: &Matrix, cells: &[Cell]) -> Self {
        let uses = |k: BackendKind| cells.iter().any(|c| c.env.backend == k);
        let host = HostBackend::probe().map(|()| {
            Arc::new(HostBackend {
                work_root: matrix.settings.host_work_dir.clone(),
            })
        });
        let docker = if uses(BackendKind::Docker) {
            crate::backend::docker::connect().await
        } else {
            Err(Unavailable {
                reason: "not used by this run".into(),
                fix: String::new(),
            })
        };
        let qemu = if uses(BackendKind::Qemu) {
            QemuBackend::probe().await
        } else {
            Err(Unavailable {
                reason: "not used by this run".into(),
                fix: String::new(),
            })
        };
        Backends { host, docker, qemu }
    }

    /// Why a backend cannot run cells here, if it cannot.
    pub fn unavailable(&self, kind: BackendKind) -> Option<Unavailable> {
        match kind {
            BackendKind::Host => self.host.as_ref().err().cloned(),
            BackendKind::Docker => self.docker.as_ref().err().cloned(),
            BackendKind::Qemu => self.qemu.as_ref().err().cloned(),
        }
    }
}

/// Messages to the dispatcher.
enum Msg {
    Backend(BackendEvent),
    BatchEnded {
        batch: String,
        result: Result<(), BatchError>,
    },
}

struct BatchState {
    env: Environment,
    /// The batch id of the first attempt (retries are named after it).
    base: String,
    /// Which repeat (`--repeat N`) this batch is, 1-based.
    repeat: u32,
    cells: Vec<Cell>,
    attempt: u32,
    reported: HashSet<String>,
    /// ERROR records held back until we know whether they are retried.
    errors: Vec<(Cell, CellRecord)>,
}

/// Run `cells` and return every result (reports are written by the caller).
pub async fn run(matrix: &Matrix, cells: Vec<Cell>, opts: &RunOptions) -> Result<RunResults> {
    let started = Instant::now();
    let started_at = crate::report::timestamp_utc();
    std::fs::create_dir_all(opts.out_dir.join("logs"))
        .with_context(|| format!("failed to create {}", opts.out_dir.display()))?;
    let jsonl_path = opts.out_dir.join("results.jsonl");
    let mut jsonl = std::fs::File::create(&jsonl_path)
        .with_context(|| format!("failed to create {}", jsonl_path.display()))?;
    let backends = Backends::probe(matrix, &cells).await;
    if let Ok(d) = &backends.docker {
        // Containers of earlier runs that were killed before they could clean up.
        match d.sweep().await {
            Ok(0) => {}
            Ok(n) => eprintln!("nsmatrix: removed {n} leftover container(s) of earlier runs"),
            Err(e) => eprintln!("nsmatrix: failed to sweep leftover containers: {e:#}"),
        }
    }
    let run_id = format!("{}-{}", opts.run_name, std::process::id());
    let agent_bin = std::env::current_exe().context("failed to find the nsmatrix binary")?;

    let repeat = opts.repeat.max(1);
    let ordinals: HashMap<String, usize> = matrix
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    let mut progress = Progress::new(opts.mode, cells.len() * repeat as usize);
    let mut results: Vec<CellResult> = Vec::new();
    let mut record =
        |r: CellResult, progress: &mut Progress, results: &mut Vec<CellResult>| -> Result<()> {
            let line = serde_json::to_string(&r).expect("results serialise");
            // One line per cell, flushed at once: a crash loses nothing already measured.
            writeln!(jsonl, "{line}")
                .and_then(|_| jsonl.flush())
                .context("failed to append to results.jsonl")?;
            progress.cell(&r);
            results.push(r);
            Ok(())
        };

    let mut cells = resolve_codex(cells, &mut progress).await;
    for c in &mut cells {
        if c.env.backend == BackendKind::Docker && c.skip.is_none() {
            c.skip = host_sysctl_mismatch(&c.env.sysctls);
        }
    }
    // Cells that cannot run here: SKIP with the reason and the fix.
    let mut by_env: Vec<(Environment, Vec<Cell>)> = Vec::new();
    let mut env_index: HashMap<String, usize> = HashMap::new();
    let mut announced = HashSet::new();
    for cell in cells {
        if let Some(reason) = &cell.skip {
            let r = not_run(
                &cell,
                Outcome::Skipped {
                    reason: reason.clone(),
                },
                0,
            );
            record(r, &mut progress, &mut results)?;
            continue;
        }
        if let Some(u) = backends.unavailable(cell.env.backend) {
            if announced.insert(cell.env.backend) {
                progress.println(&format!(
                    "nsmatrix: skipping {} cells: {u}",
                    cell.env.backend.as_str()
                ));
            }
            let r = not_run(
                &cell,
                Outcome::Skipped {
                    reason: u.to_string(),
                },
                0,
            );
            record(r, &mut progress, &mut results)?;
            continue;
        }
        let i = *env_index.entry(cell.env.id.clone()).or_insert_with(|| {
            by_env.push((cell.env.clone(), Vec::new()));
            by_env.len() - 1
        });
        by_env[i].1.push(cell);
    }

    let host_run_dir = match &backends.host {
        Ok(h) if by_env.iter().any(|(e, _)| e.backend == BackendKind::Host) => {
            h.sweep();
            Some(
                h.claim(&run_id)
                    .context("failed to create the host run directory")?,
            )
        }
        _ => None,
    };

    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let (btx, mut brx) = mpsc::unbounded_channel::<BackendEvent>();
    let permits = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let launcher = Launcher {
        backends: Arc::new(backends),
        permits,
        jobs: opts.jobs.max(1),
        tx: tx.clone(),
        btx,
        cancel: cancel.clone(),
        run_id: run_id.clone(),
        log_root: opts.out_dir.join("logs"),
        host_run_dir: host_run_dir.clone(),
        agent_bin,
        cell_timeout: matrix.settings.cell_timeout,
        batch_timeout: matrix.settings.batch_timeout,
    };
    let mut states: HashMap<String, BatchState> = HashMap::new();
    let mut infos: BTreeMap<String, BatchInfo> = BTreeMap::new();
    for (env, cells) in by_env {
        for k in 1..=repeat {
            let batch = if k == 1 {
                env.id.clone()
            } else {
                format!("{}.repeat{k}", env.id)
            };
            launcher.launch(&batch, &env, &cells);
            states.insert(
                batch.clone(),
                BatchState {
                    env: env.clone(),
                    base: batch,
                    repeat: k,
                    cells: cells.clone(),
                    attempt: 1,
                    reported: HashSet::new(),
                    errors: Vec::new(),
                },
            );
        }
        infos.insert(
            env.id.clone(),
            BatchInfo {
                environment: env.id.clone(),
                backend: env.backend.as_str().into(),
                ..Default::default()
            },
        );
    }
    let mut outstanding = states.len();
    let mut interrupted: Option<String> = None;
    // One listener each for the whole run: a signal that arrives while the dispatcher is busy
    // with a message is kept for the next turn (a listener made per turn would miss it).
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("failed to listen for SIGINT")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    let mut ctrl_c_count = 0;
    let retries = matrix.settings.retries;

    let mut queue: std::collections::VecDeque<Msg> = std::collections::VecDeque::new();
    while outstanding > 0 {
        let msg = tokio::select! {
            ev = brx.recv() => match ev { Some(ev) => Msg::Backend(ev), None => continue },
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = sigint.recv() => {
                ctrl_c_count += 1;
                if ctrl_c_count == 1 {
                    progress.println("nsmatrix: interrupted; stopping running batches and cleaning up (Ctrl-C again to stop waiting)");
                    interrupted = Some("interrupted by Ctrl-C".into());
                    cancel.cancel();
                    continue;
                }
                progress.println("nsmatrix: second Ctrl-C; writing what finished");
                break;
            }
            _ = sigterm.recv() => {
                interrupted = Some("terminated by SIGTERM".into());
                cancel.cancel();
                continue;
            }
        };
        // A batch task sends all its events before it ends: take them first, so a batch's
        // last results and stage timings are never read after its end.
        if matches!(msg, Msg::BatchEnded { .. }) {
            while let Ok(ev) = brx.try_recv() {
                queue.push_back(Msg::Backend(ev));
            }
        }
        queue.push_back(msg);
        while let Some(msg) = queue.pop_front() {
            match msg {
                Msg::Backend(BackendEvent::StageStarted { batch, stage }) => {
                    progress.batch_stage(&batch, stage.as_str());
                }
                Msg::Backend(BackendEvent::StageFinished {
                    batch,
                    stage,
                    elapsed,
                }) => {
                    if let Some(st) = states.get(&batch)
                        && let Some(info) = infos.get_mut(&st.env.id)
                    {
                        *info.stage_ms.entry(stage.as_str().to_string()).or_default() +=
                            elapsed.as_millis() as u64;
                    }
                }
                Msg::Backend(BackendEvent::Agent { batch, event }) => {
                    let Some(st) = states.get_mut(&batch) else {
                        continue;
                    };
                    match event {
                        AgentEvent::Hello { facts, .. } => {
                            if let Some(info) = infos.get_mut(&st.env.id) {
                                info.facts = facts;
                            }
                        }
                        AgentEvent::CellStarted { id } => {
                            progress.batch_stage(&batch, &format!("running {id}"))
                        }
                        AgentEvent::CellFinished(rec) => {
                            let Some(cell) = st.cells.iter().find(|c| c.id == rec.id).cloned()
                            else {
                                progress.println(&format!(
                                    "nsmatrix: batch {batch} reported an unknown cell {}",
                                    rec.id
                                ));
                                continue;
                            };
                            if !st.reported.insert(rec.id.clone()) {
                                continue;
                            }
                            if matches!(rec.outcome, Outcome::Error { .. })
                                && st.attempt <= retries
                                && !cancel.is_cancelled()
                            {
                                st.errors.push((cell, rec));
                                continue;
                            }
                            let mut r = judge(&cell, &rec, st.attempt);
                            r.repeat = st.repeat;
                            let unexpected =
                                !r.status.is_ok() && r.status != crate::report::Status::Error;
                            record(r, &mut progress, &mut results)?;
                            if unexpected && opts.fail_fast && !cancel.is_cancelled() {
                                progress.println("nsmatrix: --fail-fast: stopping after the first unexpected failure");
                                interrupted = Some("stopped by --fail-fast".into());
                                cancel.cancel();
                            }
                        }
                        AgentEvent::Log { .. } | AgentEvent::BatchDone { .. } => {}
                    }
                }
                Msg::BatchEnded { batch, result } => {
                    outstanding -= 1;
                    progress.batch_done(&batch);
                    let Some(mut st) = states.remove(&batch) else {
                        continue;
                    };
                    if let (Err(e), Some(info)) = (&result, infos.get_mut(&st.env.id)) {
                        info.error = Some(e.to_string());
                    }
                    if cancel.is_cancelled() {
                        // Whatever did not finish is not reported: the run says it was interrupted.
                        for (cell, rec) in st.errors.drain(..) {
                            let mut r = judge(&cell, &rec, st.attempt);
                            r.repeat = st.repeat;
                            record(r, &mut progress, &mut results)?;
                        }
                        continue;
                    }
                    let mut failed: Vec<(Cell, CellRecord)> = std::mem::take(&mut st.errors);
                    for cell in &st.cells {
                        if !st.reported.contains(&cell.id) {
                            let (stage, message) = match &result {
                                Err(e) => (e.stage.as_str().to_string(), e.message.clone()),
                                Ok(()) => {
                                    ("agent".into(), "the agent did not report this cell".into())
                                }
                            };
                            let rec = not_run_record(cell, Outcome::Error { stage, message });
                            failed.push((cell.clone(), rec));
                        }
                    }
                    if failed.is_empty() {
                        continue;
                    }
                    if st.attempt <= retries {
                        let retry_cells: Vec<Cell> = failed.into_iter().map(|(c, _)| c).collect();
                        let attempt = st.attempt + 1;
                        let id = format!("{}.retry{}", st.base, attempt - 1);
                        progress.println(&format!(
                            "nsmatrix: retrying {} cell(s) of {} after ERROR (attempt {attempt})",
                            retry_cells.len(),
                            st.env.id
                        ));
                        launcher.launch(&id, &st.env, &retry_cells);
                        states.insert(
                            id,
                            BatchState {
                                env: st.env,
                                base: st.base,
                                repeat: st.repeat,
                                cells: retry_cells,
                                attempt,
                                reported: HashSet::new(),
                                errors: Vec::new(),
                            },
                        );
                        outstanding += 1;
                    } else {
                        for (cell, rec) in failed {
                            let mut r = judge(&cell, &rec, st.attempt);
                            r.repeat = st.repeat;
                            record(r, &mut progress, &mut results)?;
                        }
                    }
                }
            }
        }
    }
    progress.finish();
    if let Some(dir) = &host_run_dir {
        // Every agent removes its own batch directory; this is the fallback for killed ones.
        let _ = std::fs::remove_dir_all(dir);
    }
    // One cell per id (repeats folded), in the matrix's order: never the order batches
    // happened to finish in, so shards merge into exactly an unsharded run's results.
    for r in &mut results {
        r.ordinal = ordinals.get(&r.id).copied().unwrap_or(usize::MAX);
    }
    let mut results = crate::report::model::fold_repeats(results);
    results.sort_by(|a, b| a.ordinal.cmp(&b.ordinal).then_with(|| a.id.cmp(&b.id)));
    Ok(RunResults {
        schema_version: SCHEMA_VERSION,
        run_name: opts.run_name.clone(),
        matrix: matrix.path.display().to_string(),
        started: started_at,
        duration_ms: started.elapsed().as_millis() as u64,
        interrupted,
        host: crate::agent::environment_facts(),
        batches: infos.into_values().collect(),
        cells: results,
        shard: None,
        repeat,
        require: matrix.settings.require.clone(),
    })
}

fn not_run_record(cell: &Cell, outcome: Outcome) -> CellRecord {
    CellRecord::outcome_only(&cell.id, outcome)
}

/// Starts batch tasks; each waits for its share of the concurrency budget.
struct Launcher {
    backends: Arc<Backends>,
    permits: Arc<Semaphore>,
    jobs: usize,
    tx: mpsc::UnboundedSender<Msg>,
    btx: mpsc::UnboundedSender<BackendEvent>,
    cancel: CancellationToken,
    run_id: String,
    log_root: PathBuf,
    host_run_dir: Option<PathBuf>,
    agent_bin: PathBuf,
    cell_timeout: Duration,
    batch_timeout: Duration,
}

impl Launcher {
    fn launch(&self, batch: &str, env: &Environment, cells: &[Cell]) {
        let work_root = self
            .host_run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/nsmatrix-work"));
        let spec = batch_spec(
            batch,
            env,
            cells,
            &work_root,
            &self.agent_bin,
            self.cell_timeout,
        );
        // A guest weighs more than a process or a container.
        let weight = match env.backend {
            BackendKind::Qemu => 2.min(self.jobs) as u32,
            _ => 1,
        };
        let ctx = BatchCtx {
            run_id: self.run_id.clone(),
            batch_id: batch.to_string(),
            log_dir: self.log_root.join(batch),
            timeout: self.batch_timeout,
            cancel: self.cancel.clone(),
            events: self.btx.clone(),
        };
        let backends = self.backends.clone();
        let permits = self.permits.clone();
        let tx = self.tx.clone();
        let env = env.clone();
        let batch = batch.to_string();
        tokio::spawn(async move {
            let result = tokio::select! {
                p = permits.acquire_many_owned(weight) => {
                    let _permit = p.expect("semaphore is never closed");
                    if ctx.cancel.is_cancelled() {
                        Err(BatchError::new(crate::backend::Stage::Provision, "cancelled before it started"))
                    } else {
                        run_on(&backends, &env, spec, &ctx).await
                    }
                }
                _ = ctx.cancel.cancelled() => Err(BatchError::new(crate::backend::Stage::Provision, "cancelled before it started")),
            };
            let _ = tx.send(Msg::BatchEnded { batch, result });
        });
    }
}

/// Docker cannot set `user.*` (or `kernel.*`) sysctls per container (runc refuses): a docker
/// environment that names sysctl values runs only where the host already has them. nsmatrix
/// never changes the host's sysctls.
pub fn host_sysctl_mismatch(want: &BTreeMap<String, String>) -> Option<String> {
    for (k, v) in want {
        let path = std::path::Path::new("/proc/sys").join(k.replace('.', "/"));
        match std::fs::read_to_string(&path) {
            Ok(have) if have.trim() == v.trim() => {}
            Ok(have) => {
                return Some(format!(
                    "needs the host's {k}={v} but the host has {}; Docker cannot set it per container and nsmatrix never changes the host's sysctls (fix: run where the host has it, or use a qemu environment)",
                    have.trim()
                ));
            }
            Err(_) => {
                return Some(format!(
                    "needs the host's {k}={v} but this kernel has no such sysctl (fix: use a qemu environment)"
                ));
            }
        }
    }
    None
}

/// Fetch (once, verified, cached) every Codex release the cells name and point their subjects
/// at it; cells of a release that cannot be had are SKIPped with the reason.
async fn resolve_codex(mut cells: Vec<Cell>, progress: &mut Progress) -> Vec<Cell> {
    use crate::agent::protocol::SubjectSpec;
    let mut versions: Vec<String> = cells
        .iter()
        .filter_map(|c| match &c.subject.spec {
            SubjectSpec::Codex { version, .. } => Some(version.clone()),
            _ => None,
        })
        .collect();
    versions.sort();
    versions.dedup();
    let mut found: HashMap<String, Result<PathBuf, String>> = HashMap::new();
    for v in versions {
        progress.println(&format!(
            "nsmatrix: getting Codex CLI {v} (npm, cached after the first time)"
        ));
        let vv = v.clone();
        let r = tokio::task::spawn_blocking(move || crate::artifacts::npm::codex_package(&vv))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map(|p| p.codex).map_err(|e| format!("{e:#}")));
        if let Err(e) = &r {
            progress.println(&format!("nsmatrix: Codex CLI {v} is not available: {e}"));
        }
        found.insert(v, r);
    }
    for c in &mut cells {
        if let SubjectSpec::Codex { version, codex_bin } = &mut c.subject.spec {
            match found.get(version.as_str()) {
                Some(Ok(p)) => *codex_bin = p.clone(),
                Some(Err(e)) => {
                    c.skip = Some(format!(
                        "Codex CLI {version} could not be fetched and is not cached: {e} (fix: reach the npm registry once, or set NSMATRIX_NPM_REGISTRY)"
                    ))
                }
                None => {}
            }
        }
    }
    cells
}

/// The batch spec for `cells` of one environment (paths as on the host; backends relocate).
pub fn batch_spec(
    batch: &str,
    env: &Environment,
    cells: &[Cell],
    work_root: &std::path::Path,
    agent_bin: &std::path::Path,
    cell_timeout: Duration,
) -> BatchSpec {
    BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: batch.to_string(),
        work_dir: work_root.join(batch),
        uid: env.uid,
        gid: env.uid,
        restrictions: match env.backend {
            BackendKind::Host => HostBackend::restrictions(env.profile.as_ref()),
            _ => Default::default(),
        },
        // Only a guest's agent writes sysctls; elsewhere they are the host's (checked, never set).
        sysctls: if env.backend == BackendKind::Qemu {
            env.sysctls.clone()
        } else {
            Default::default()
        },
        agent_bin: agent_bin.to_path_buf(),
        cells: cells
            .iter()
            .map(|c| CellSpec {
                id: c.id.clone(),
                subject: c.subject.spec.clone(),
                scenario_dir: c.scenario.dir.clone(),
                timeout_ms: cell_timeout.as_millis() as u64,
                needs_sysctls: if env.backend == BackendKind::Qemu {
                    env.sysctls.keys().cloned().collect()
                } else {
                    Vec::new()
                },
            })
            .collect(),
    }
}

async fn run_on(
    backends: &Backends,
    env: &Environment,
    spec: BatchSpec,
    ctx: &BatchCtx,
) -> Result<(), BatchError> {
    match env.backend {
        BackendKind::Host => match &backends.host {
            Ok(h) => h.run_batch(env, spec, ctx).await,
            Err(u) => Err(BatchError::new(
                crate::backend::Stage::Provision,
                u.to_string(),
            )),
        },
        BackendKind::Docker => match &backends.docker {
            Ok(d) => d.run_batch(env, spec, ctx).await,
            Err(u) => Err(BatchError::new(
                crate::backend::Stage::Provision,
                u.to_string(),
            )),
        },
        BackendKind::Qemu => match &backends.qemu {
            Ok(q) => q.run_batch(env, spec, ctx).await,
            Err(u) => Err(BatchError::new(
                crate::backend::Stage::Provision,
                u.to_string(),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_sysctls_are_checked_against_the_host_never_set() {
        let have = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap();
        let ok = BTreeMap::from([("kernel.pid_max".to_string(), have.trim().to_string())]);
        assert_eq!(host_sysctl_mismatch(&ok), None);
        let other = BTreeMap::from([("kernel.pid_max".to_string(), "1".to_string())]);
        assert!(
            host_sysctl_mismatch(&other)
                .unwrap()
                .contains("but the host has")
        );
        let missing = BTreeMap::from([("kernel.no_such_knob_here".to_string(), "0".to_string())]);
        assert!(
            host_sysctl_mismatch(&missing)
                .unwrap()
                .contains("no such sysctl")
        );
        // Unchanged by the check.
        assert_eq!(
            std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap(),
            have
        );
    }
}
