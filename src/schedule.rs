//! The scheduler: dispatches a [`Plan`]'s batches to their backends with bounded concurrency,
//! timeouts, retries of ERROR only, `--repeat`, fail-fast and Ctrl-C, and judges every result
//! as it arrives. What runs where was decided by the plan.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendEvent, BatchCtx, BatchError, Demand, Stage};
use crate::matrix::model::{Cell, Environment, Settings};
use crate::plan::Plan;
use crate::protocol::{AgentEvent, BatchSpec, CellRecord, Outcome};
use crate::record::Recorder;
use crate::report::model::{BatchInfo, judge};
use crate::report::timeline::{Span, StageSpan, Timeline};

/// How to dispatch: the run's options the scheduler reads.
pub(crate) struct DispatchOptions {
    pub(crate) jobs: usize,
    pub(crate) fail_fast: bool,
    /// Run every batch this many times (`--repeat N`).
    pub(crate) repeat: u32,
    /// `logs/` of the run's output directory: one directory per batch.
    pub(crate) log_root: PathBuf,
    /// Memory batches may hold at once, in MiB (None: no limit).
    pub(crate) memory_mb: Option<u64>,
    /// When the run started (the timeline's zero).
    pub(crate) run_started: Instant,
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
    pub(crate) timeline: Timeline,
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
    let jobs = opts.jobs.max(1);
    let mut launcher = Launcher {
        pool: Pool::new(jobs, opts.memory_mb),
        pending: VecDeque::new(),
        running: HashMap::new(),
        tx,
        btx,
        cancel: cancel.clone(),
        run_id: run_id.to_string(),
        log_root: opts.log_root.clone(),
        batch_timeout: settings.batch_timeout,
        t0: opts.run_started,
        timeline: Timeline {
            jobs: jobs as u32,
            memory_budget_mb: opts.memory_mb,
            ..Default::default()
        },
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
            launcher.queue(&id, &b.backend, &b.env, b.spec_for(&id, &b.cells));
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

    launcher.fill();
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
                    launcher.stage_started(&batch, stage);
                    rec.progress.batch_stage(&batch, stage.as_str());
                }
                Msg::Backend(BackendEvent::StageFinished {
                    batch,
                    stage,
                    elapsed,
                }) => {
                    launcher.stage_finished(&batch, stage);
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
                    launcher.ended(&batch, result.is_err());
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
                        launcher.queue(&id, &b.backend, &b.env, b.spec_for(&id, &retry_cells));
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
        // Slots freed, retries queued or a cancel: start what now fits.
        launcher.fill();
    }
    let mut timeline = launcher.timeline;
    timeline.dispatch_start_ms = timeline.spans.iter().map(|s| s.start_ms).min().unwrap_or(0);
    timeline.dispatch_end_ms = timeline.spans.iter().map(|s| s.end_ms).max().unwrap_or(0);
    Ok(Dispatched {
        batches: infos.into_values().collect(),
        interrupted,
        aborted,
        timeline,
    })
}

/// The machine's budget: job slots (lanes of the timeline), memory, and how many batches of
/// each group run now.
#[derive(Debug)]
struct Pool {
    /// Which slots are taken.
    lanes: Vec<bool>,
    memory_total: Option<u64>,
    memory_free: u64,
    groups: HashMap<String, u32>,
}

/// What a started batch holds until it ends.
#[derive(Debug)]
struct Held {
    lanes: Vec<u32>,
    memory_mb: u64,
    group: Option<String>,
}

impl Pool {
    fn new(jobs: usize, memory_mb: Option<u64>) -> Pool {
        Pool {
            lanes: vec![false; jobs.max(1)],
            memory_total: memory_mb,
            memory_free: memory_mb.unwrap_or(0),
            groups: HashMap::new(),
        }
    }

    /// A demand the machine can never meet whole is met by all of it: the batch then runs
    /// alone rather than never.
    fn clamp(&self, d: &Demand) -> (usize, u64) {
        let cpus = (d.cpus.max(1) as usize).min(self.lanes.len());
        let mem = self.memory_total.map_or(0, |t| d.memory_mb.min(t));
        (cpus, mem)
    }

    /// Take what `d` needs if all of it is free now.
    fn try_take(&mut self, d: &Demand) -> Option<Held> {
        let (cpus, mem) = self.clamp(d);
        if let Some((key, limit)) = &d.group
            && self.groups.get(key).copied().unwrap_or(0) >= (*limit).max(1)
        {
            return None;
        }
        let free: Vec<u32> = (0..self.lanes.len() as u32)
            .filter(|&i| !self.lanes[i as usize])
            .take(cpus)
            .collect();
        if free.len() < cpus || (self.memory_total.is_some() && self.memory_free < mem) {
            return None;
        }
        for &i in &free {
            self.lanes[i as usize] = true;
        }
        self.memory_free -= mem;
        if let Some((key, _)) = &d.group {
            *self.groups.entry(key.clone()).or_default() += 1;
        }
        Some(Held {
            lanes: free,
            memory_mb: mem,
            group: d.group.as_ref().map(|g| g.0.clone()),
        })
    }

    fn give_back(&mut self, h: Held) {
        for i in h.lanes {
            self.lanes[i as usize] = false;
        }
        self.memory_free += h.memory_mb;
        if let Some(key) = h.group
            && let Some(n) = self.groups.get_mut(&key)
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// The memory batches may hold at once: what the kernel says is available now, less a reserve
/// for this process, the Docker engine and the rest of the machine. `NSMATRIX_MEMORY_MB`
/// overrides it (to run as a smaller machine would).
pub(crate) fn memory_budget_mb() -> Option<u64> {
    if let Some(v) = std::env::var("NSMATRIX_MEMORY_MB")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return Some(v);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let available = kb / 1024;
    Some(available.saturating_sub(MEMORY_RESERVE_MB.min(available / 4)))
}

/// Memory left to the machine beside the batches (at most a quarter of what is available).
const MEMORY_RESERVE_MB: u64 = 1024;

/// A batch waiting for its share of the machine.
struct Queued {
    id: String,
    backend: Arc<dyn Backend>,
    env: Environment,
    spec: BatchSpec,
    demand: Demand,
}

/// Starts batches in the plan's order as their demand fits the budget; a batch that does not
/// fit yet lets a later one that does go first. Keeps the timeline.
struct Launcher {
    pool: Pool,
    pending: VecDeque<Queued>,
    /// Started batches: what they hold, their span in the timeline and its open stage.
    running: HashMap<String, (Held, usize, Option<usize>)>,
    tx: mpsc::UnboundedSender<Msg>,
    btx: mpsc::UnboundedSender<BackendEvent>,
    cancel: CancellationToken,
    run_id: String,
    log_root: PathBuf,
    batch_timeout: Duration,
    t0: Instant,
    timeline: Timeline,
}

impl Launcher {
    fn queue(
        &mut self,
        batch: &str,
        backend: &Arc<dyn Backend>,
        env: &Environment,
        spec: BatchSpec,
    ) {
        self.pending.push_back(Queued {
            id: batch.to_string(),
            backend: backend.clone(),
            demand: backend.demand(env),
            env: env.clone(),
            spec,
        });
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Start every queued batch that fits now, in order. After a cancel every queued batch
    /// ends at once as not started.
    fn fill(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.cancel.is_cancelled() {
                let q = self.pending.remove(i).expect("index in range");
                let _ = self.tx.send(Msg::BatchEnded {
                    batch: q.id,
                    result: Err(BatchError::new(
                        Stage::Provision,
                        "cancelled before it started",
                    )),
                });
                continue;
            }
            let Some(held) = self.pool.try_take(&self.pending[i].demand) else {
                i += 1;
                continue;
            };
            let q = self.pending.remove(i).expect("index in range");
            self.timeline.spans.push(Span {
                batch: q.id.clone(),
                environment: q.env.id.clone(),
                backend: q.env.backend().as_str().to_string(),
                lanes: held.lanes.clone(),
                memory_mb: held.memory_mb,
                cells: q.spec.cells.len(),
                start_ms: self.now_ms(),
                ..Default::default()
            });
            self.running
                .insert(q.id.clone(), (held, self.timeline.spans.len() - 1, None));
            self.start(q);
        }
    }

    fn start(&self, q: Queued) {
        let ctx = BatchCtx {
            run_id: self.run_id.clone(),
            batch_id: q.id.clone(),
            log_dir: self.log_root.join(&q.id),
            timeout: self.batch_timeout,
            cancel: self.cancel.clone(),
            events: self.btx.clone(),
        };
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = if ctx.cancel.is_cancelled() {
                Err(BatchError::new(
                    Stage::Provision,
                    "cancelled before it started",
                ))
            } else {
                q.backend.run_batch(&q.env, q.spec, &ctx).await
            };
            let _ = tx.send(Msg::BatchEnded {
                batch: q.id,
                result,
            });
        });
    }

    fn span(&mut self, batch: &str) -> Option<&mut Span> {
        let i = self.running.get(batch)?.1;
        self.timeline.spans.get_mut(i)
    }

    /// A batch's stages follow one another: one that starts ends the one still open (a
    /// backend need not report every end).
    fn stage_started(&mut self, batch: &str, stage: Stage) {
        let now = self.now_ms();
        self.close_open_stage(batch, now);
        if let Some(s) = self.span(batch) {
            s.stages.push(StageSpan {
                stage: stage.as_str().to_string(),
                start_ms: now,
                end_ms: now,
            });
            let open = s.stages.len() - 1;
            if let Some(r) = self.running.get_mut(batch) {
                r.2 = Some(open);
            }
        }
    }

    fn stage_finished(&mut self, batch: &str, stage: Stage) {
        let now = self.now_ms();
        let Some(&(_, i, Some(open))) = self.running.get(batch) else {
            return;
        };
        if let Some(st) = self.timeline.spans[i].stages.get_mut(open)
            && st.stage == stage.as_str()
        {
            st.end_ms = now;
            if let Some(r) = self.running.get_mut(batch) {
                r.2 = None;
            }
        }
    }

    fn close_open_stage(&mut self, batch: &str, now: u64) {
        if let Some(r) = self.running.get_mut(batch)
            && let Some(open) = r.2.take()
            && let Some(st) = self.timeline.spans[r.1].stages.get_mut(open)
        {
            st.end_ms = now;
        }
    }

    /// A batch ended: its share goes back and its span (and a stage left open) closes.
    fn ended(&mut self, batch: &str, failed: bool) {
        let now = self.now_ms();
        self.close_open_stage(batch, now);
        let Some((held, i, _)) = self.running.remove(batch) else {
            return;
        };
        self.pool.give_back(held);
        if let Some(s) = self.timeline.spans.get_mut(i) {
            s.end_ms = now;
            s.failed = failed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(mem: u64) -> Demand {
        Demand {
            cpus: 1,
            memory_mb: mem,
            group: None,
        }
    }

    #[test]
    fn two_one_vcpu_guests_share_two_slots() {
        let mut p = Pool::new(2, Some(8_000));
        let a = p.try_take(&guest(640)).expect("first guest");
        let b = p.try_take(&guest(640)).expect("second guest beside it");
        assert_eq!((a.lanes.clone(), b.lanes.clone()), (vec![0], vec![1]));
        assert!(p.try_take(&Demand::PROCESS).is_none(), "no slot left");
        p.give_back(a);
        assert_eq!(p.try_take(&Demand::PROCESS).unwrap().lanes, vec![0]);
    }

    #[test]
    fn memory_limits_guests_on_a_small_machine() {
        // 1 GiB for batches: one 640 MiB guest at a time, processes beside it.
        let mut p = Pool::new(2, Some(1_024));
        let a = p.try_take(&guest(640)).expect("first guest");
        assert!(p.try_take(&guest(640)).is_none(), "no memory for a second");
        assert!(
            p.try_take(&Demand::PROCESS).is_some(),
            "a process needs none"
        );
        p.give_back(a);
        assert!(p.try_take(&guest(640)).is_some(), "its memory is back");
        // A guest larger than the whole budget runs alone rather than never.
        let mut p = Pool::new(2, Some(512));
        let big = p.try_take(&guest(4_096)).expect("clamped to the budget");
        assert_eq!(big.memory_mb, 512);
        assert!(p.try_take(&guest(64)).is_none());
    }

    #[test]
    fn a_group_runs_its_limit_at_once_and_cpus_are_clamped() {
        let mut p = Pool::new(4, None);
        let g = Demand {
            cpus: 1,
            memory_mb: 1_600,
            group: Some(("engine debian-6.1".into(), 1)),
        };
        let a = p.try_take(&g).expect("first of the group");
        assert!(p.try_take(&g).is_none(), "one at a time");
        let other = Demand {
            group: Some(("engine other".into(), 1)),
            ..g.clone()
        };
        assert!(p.try_take(&other).is_some(), "another group is free");
        p.give_back(a);
        assert!(p.try_take(&g).is_some());
        let wide = Demand {
            cpus: 8,
            memory_mb: 0,
            group: None,
        };
        let mut p = Pool::new(2, None);
        assert_eq!(p.try_take(&wide).unwrap().lanes, vec![0, 1]);
    }
}
