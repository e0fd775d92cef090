//! The scheduler: dispatches a [`Plan`]'s batches to their backends with bounded concurrency,
//! timeouts, retries of ERROR only, `--repeat`, fail-fast and Ctrl-C, and judges every result
//! as it arrives. What runs where was decided by the plan.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendEvent, BatchCtx, BatchError, Stage};
use crate::matrix::model::{Cell, Environment, Settings};
use crate::plan::Plan;
use crate::protocol::{AgentEvent, BatchSpec, CellRecord, Outcome};
use crate::record::Recorder;
use crate::report::model::{BatchInfo, judge};

/// How to dispatch: the run's options the scheduler reads.
pub(crate) struct DispatchOptions {
    pub(crate) jobs: usize,
    pub(crate) fail_fast: bool,
    /// Run every batch this many times (`--repeat N`).
    pub(crate) repeat: u32,
    /// `logs/` of the run's output directory: one directory per batch.
    pub(crate) log_root: PathBuf,
}

/// Messages to the dispatcher.
enum Msg {
    Backend(BackendEvent),
    BatchEnded {
        batch: String,
        result: Result<(), BatchError>,
    },
}

/// One attempt of one batch in flight.
struct BatchState {
    /// The plan's batch (index).
    plan: usize,
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

/// What the dispatcher leaves for the run's results.
pub(crate) struct Dispatched {
    pub(crate) batches: Vec<BatchInfo>,
    pub(crate) interrupted: Option<String>,
    /// A second Ctrl-C: batches may still be running; their backends must remove them.
    pub(crate) aborted: bool,
}

/// Run every batch of `plan` (`opts.repeat` times) and record each judged result.
pub(crate) async fn dispatch(
    plan: &Plan,
    run_id: &str,
    settings: &Settings,
    opts: &DispatchOptions,
    rec: &mut Recorder,
) -> Result<Dispatched> {
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let (btx, mut brx) = mpsc::unbounded_channel::<BackendEvent>();
    let launcher = Launcher {
        permits: Arc::new(Semaphore::new(opts.jobs.max(1))),
        jobs: opts.jobs.max(1),
        tx,
        btx,
        cancel: cancel.clone(),
        run_id: run_id.to_string(),
        log_root: opts.log_root.clone(),
        batch_timeout: settings.batch_timeout,
    };
    let mut states: HashMap<String, BatchState> = HashMap::new();
    let mut infos: BTreeMap<String, BatchInfo> = BTreeMap::new();
    for (i, b) in plan.batches.iter().enumerate() {
        for k in 1..=opts.repeat.max(1) {
            let id = if k == 1 {
                b.env.id.clone()
            } else {
                format!("{}.repeat{k}", b.env.id)
            };
            launcher.launch(&id, &b.backend, &b.env, b.spec_for(&id, &b.cells));
            states.insert(
                id.clone(),
                BatchState {
                    plan: i,
                    base: id,
                    repeat: k,
                    cells: b.cells.clone(),
                    attempt: 1,
                    reported: HashSet::new(),
                    errors: Vec::new(),
                },
            );
        }
        infos.insert(
            b.env.id.clone(),
            BatchInfo {
                environment: b.env.id.clone(),
                backend: b.env.backend().as_str().into(),
                ..Default::default()
            },
        );
    }
    let mut outstanding = states.len();
    let mut interrupted: Option<String> = None;
    let mut aborted = false;
    // One listener each for the whole run: a signal that arrives while the dispatcher is busy
    // with a message is kept for the next turn (a listener made per turn would miss it).
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("failed to listen for SIGINT")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    let mut ctrl_c_count = 0;
    let retries = settings.retries;
    let env_of = |st: &BatchState| -> &Environment { &plan.batches[st.plan].env };

    let mut queue: VecDeque<Msg> = VecDeque::new();
    while outstanding > 0 {
        let msg = tokio::select! {
            ev = brx.recv() => match ev { Some(ev) => Msg::Backend(ev), None => continue },
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = sigint.recv() => {
                ctrl_c_count += 1;
                if ctrl_c_count == 1 {
                    rec.progress.println("nsmatrix: interrupted; stopping running batches and cleaning up (Ctrl-C again to stop waiting)");
                    interrupted = Some("interrupted by Ctrl-C".into());
                    cancel.cancel();
                    continue;
                }
                rec.progress.println("nsmatrix: second Ctrl-C; removing what this run created, writing what finished");
                aborted = true;
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
                    rec.progress.batch_stage(&batch, stage.as_str());
                }
                Msg::Backend(BackendEvent::StageFinished {
                    batch,
                    stage,
                    elapsed,
                }) => {
                    if let Some(st) = states.get(&batch)
                        && let Some(info) = infos.get_mut(&env_of(st).id)
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
                            if let Some(info) = infos.get_mut(&plan.batches[st.plan].env.id) {
                                info.facts = facts;
                            }
                        }
                        AgentEvent::CellStarted { id } => {
                            rec.progress.batch_stage(&batch, &format!("running {id}"))
                        }
                        AgentEvent::CellFinished(r) => {
                            let Some(cell) = st.cells.iter().find(|c| c.id == r.id).cloned() else {
                                rec.progress.println(&format!(
                                    "nsmatrix: batch {batch} reported an unknown cell {}",
                                    r.id
                                ));
                                continue;
                            };
                            if !st.reported.insert(r.id.clone()) {
                                continue;
                            }
                            if matches!(r.outcome, Outcome::Error { .. })
                                && st.attempt <= retries
                                && !cancel.is_cancelled()
                            {
                                st.errors.push((cell, r));
                                continue;
                            }
                            let mut res = judge(&cell, &r, st.attempt);
                            res.repeat = st.repeat;
                            let unexpected =
                                !res.status.is_ok() && res.status != crate::report::Status::Error;
                            rec.record(res)?;
                            if unexpected && opts.fail_fast && !cancel.is_cancelled() {
                                rec.progress.println("nsmatrix: --fail-fast: stopping after the first unexpected failure");
                                interrupted = Some("stopped by --fail-fast".into());
                                cancel.cancel();
                            }
                        }
                        AgentEvent::Log { .. } | AgentEvent::BatchDone { .. } => {}
                    }
                }
                Msg::BatchEnded { batch, result } => {
                    outstanding -= 1;
                    rec.progress.batch_done(&batch);
                    let Some(mut st) = states.remove(&batch) else {
                        continue;
                    };
                    let b = &plan.batches[st.plan];
                    if let (Err(e), Some(info)) = (&result, infos.get_mut(&b.env.id)) {
                        info.error = Some(e.to_string());
                    }
                    if cancel.is_cancelled() {
                        // Whatever did not finish is not reported: the run says it was interrupted.
                        for (cell, r) in st.errors.drain(..) {
                            let mut res = judge(&cell, &r, st.attempt);
                            res.repeat = st.repeat;
                            rec.record(res)?;
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
                            let r = CellRecord::outcome_only(
                                &cell.id,
                                Outcome::Error { stage, message },
                            );
                            failed.push((cell.clone(), r));
                        }
                    }
                    if failed.is_empty() {
                        continue;
                    }
                    if st.attempt <= retries {
                        let retry_cells: Vec<Cell> = failed.into_iter().map(|(c, _)| c).collect();
                        let attempt = st.attempt + 1;
                        let id = format!("{}.retry{}", st.base, attempt - 1);
                        rec.progress.println(&format!(
                            "nsmatrix: retrying {} cell(s) of {} after ERROR (attempt {attempt})",
                            retry_cells.len(),
                            b.env.id
                        ));
                        launcher.launch(&id, &b.backend, &b.env, b.spec_for(&id, &retry_cells));
                        states.insert(
                            id,
                            BatchState {
                                plan: st.plan,
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
                        for (cell, r) in failed {
                            let mut res = judge(&cell, &r, st.attempt);
                            res.repeat = st.repeat;
                            rec.record(res)?;
                        }
                    }
                }
            }
        }
    }
    Ok(Dispatched {
        batches: infos.into_values().collect(),
        interrupted,
        aborted,
    })
}

/// Starts batch tasks; each waits for its share of the concurrency budget.
struct Launcher {
    permits: Arc<Semaphore>,
    jobs: usize,
    tx: mpsc::UnboundedSender<Msg>,
    btx: mpsc::UnboundedSender<BackendEvent>,
    cancel: CancellationToken,
    run_id: String,
    log_root: PathBuf,
    batch_timeout: Duration,
}

impl Launcher {
    fn launch(&self, batch: &str, backend: &Arc<dyn Backend>, env: &Environment, spec: BatchSpec) {
        let weight = backend.weight(self.jobs);
        let ctx = BatchCtx {
            run_id: self.run_id.clone(),
            batch_id: batch.to_string(),
            log_dir: self.log_root.join(batch),
            timeout: self.batch_timeout,
            cancel: self.cancel.clone(),
            events: self.btx.clone(),
        };
        let backend = backend.clone();
        let permits = self.permits.clone();
        let tx = self.tx.clone();
        let env = env.clone();
        let batch = batch.to_string();
        tokio::spawn(async move {
            let not_started = || BatchError::new(Stage::Provision, "cancelled before it started");
            let result = tokio::select! {
                p = permits.acquire_many_owned(weight) => {
                    let _permit = p.expect("semaphore is never closed");
                    if ctx.cancel.is_cancelled() {
                        Err(not_started())
                    } else {
                        backend.run_batch(&env, spec, &ctx).await
                    }
                }
                _ = ctx.cancel.cancelled() => Err(not_started()),
            };
            let _ = tx.send(Msg::BatchEnded { batch, result });
        });
    }
}
