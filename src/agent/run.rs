//! [`run_batch`]: every cell of a batch, inside its environment: one after another, or in a
//! guest with several vCPUs and no security policy loaded, those that reach nothing outside
//! their own directory side by side (see [`Batch::workers`]).
//!
//! Per cell: lay the scenario out in a fresh workspace owned by the cell's uid, prepare the
//! subject, run the sandbox with `apply_patch` inside under the batch's restrictions, then
//! judge what came back: sandbox signature, exit code, output, tree, sentinel. The agent knows
//! nothing of Docker or QEMU and nothing of the matrix's expectations.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use anyhow::{Context, Result};

use super::cell::{
    CellCtx, RunOutput, agent_has_nnp, error, install_signal_handlers, lay_out, record, remove_any,
    run_program, shell_words, stopping,
};
use super::judge::judge;
use crate::protocol::{AgentEvent, BatchSpec, CellRecord, Outcome, PROTOCOL_VERSION, SubjectSpec};
use crate::sandbox::{argv, subject};
use crate::scenario;
use crate::text::tail;

/// Run a whole batch, writing [`AgentEvent`] lines to `out`. The batch's `work_dir` is removed
/// at the end whatever happens.
pub(crate) fn run_batch(spec: &BatchSpec, out: &mut dyn Write) -> Result<()> {
    install_signal_handlers();
    let mut emit = |ev: AgentEvent| -> Result<()> {
        out.write_all(ev.to_line().as_bytes())
            .context("failed to write an agent event")?;
        out.flush().context("failed to flush agent events")
    };
    // The sysctls first, so the facts the batch reports are those its cells run under (a
    // max-userns-0 guest reports 0, not the kernel's default); their log lines follow Hello.
    let mut pending: Vec<AgentEvent> = Vec::new();
    let sysctls = if spec.version == PROTOCOL_VERSION {
        apply_sysctls(&spec.sysctls, &mut |ev| {
            pending.push(ev);
            Ok(())
        })
    } else {
        Ok(BTreeSet::new())
    };
    emit(AgentEvent::Hello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        facts: environment_facts(),
    })?;
    for ev in pending {
        emit(ev)?;
    }
    if spec.version != PROTOCOL_VERSION {
        anyhow::bail!(
            "batch spec version {} is not {PROTOCOL_VERSION}",
            spec.version
        );
    }
    let missing_sysctls = sysctls?;
    let apparmor = match &spec.restrictions.apparmor {
        None => Ok(None),
        Some(p) => super::lsm::load(p).map(|loaded| Some((p.sets.clone(), loaded))),
    };
    // In a guest the kernel's log is the cells' own: follow it for their evidence. In a
    // container of an engine guest, which runs one container at a time, the guest's init
    // relays it to a file the container has.
    if super::init::is_guest_init()
        && let Err(e) = super::kmsg::open(matches!(apparmor, Ok(Some(_))))
    {
        emit(AgentEvent::Log {
            message: format!("the kernel's log (/dev/kmsg) cannot be followed: {e}"),
        })?;
    } else if let Some(relay) = &spec.kernel_log {
        let confined = apparmor_label().is_some_and(|l| l != "unconfined");
        if let Err(e) = super::kmsg::open_relay(relay, confined) {
            emit(AgentEvent::Log {
                message: format!(
                    "the kernel's log ({}) cannot be followed: {e}",
                    relay.display()
                ),
            })?;
        }
    }
    emit(AgentEvent::Log {
        message: match &apparmor {
            Ok(None) => "apparmor: no policy to load".into(),
            Ok(Some((sets, loaded))) => format!("apparmor: loaded {sets}: {loaded}"),
            Err(super::lsm::Refused::Skip(why)) => format!("apparmor: {why}"),
            Err(super::lsm::Refused::Error(why)) => format!("apparmor: {why}"),
        },
    })?;
    let work = WorkDir::create(&spec.work_dir)?;
    let bin_dir = work.path.join("bin");
    mkdir_mode(&bin_dir, 0o755)?;
    let apply_patch = bin_dir.join("apply_patch");
    std::os::unix::fs::symlink(&spec.agent_bin, &apply_patch)
        .with_context(|| format!("failed to link {}", apply_patch.display()))?;
    let batch = Batch {
        spec,
        apparmor: &apparmor,
        missing_sysctls: &missing_sysctls,
        cells_dir: work.path.join("cells"),
        apply_patch: &apply_patch,
        preparer: Mutex::new(subject::Preparer::new(work.path.join("subjects"))),
        codex_copies: Mutex::new(super::codex::Copies::new(work.path.join("codex"))),
        side_by_side: AtomicBool::new(false),
    };
    let workers = batch.workers();
    let (beside, alone): (Vec<usize>, Vec<usize>) =
        (0..spec.cells.len()).partition(|&i| workers > 1 && batch.may_run_beside_others(i));
    let mut done = 0;
    for i in alone {
        if stopping() {
            break;
        }
        emit(AgentEvent::CellStarted {
            id: spec.cells[i].id.clone(),
        })?;
        emit(AgentEvent::CellFinished(batch.cell(i)))?;
        done += 1;
    }
    if !beside.is_empty() && !stopping() {
        emit(AgentEvent::Log {
            message: format!(
                "agent: {} cells side by side, {} at a time ({workers} vCPUs); the other {} one after another first",
                beside.len(),
                workers.min(beside.len()),
                spec.cells.len() - beside.len()
            ),
        })?;
        done += batch.run_side_by_side(&beside, workers, &mut emit)?;
    }
    drop(work);
    if stopping() {
        emit(AgentEvent::Log {
            message: "agent: interrupted; stopped after cleaning up".into(),
        })?;
        anyhow::bail!("interrupted");
    }
    emit(AgentEvent::BatchDone { cells: done })
}

/// What every cell of a batch shares while the batch runs.
struct Batch<'a> {
    spec: &'a BatchSpec,
    apparmor: &'a std::result::Result<Option<(String, String)>, super::lsm::Refused>,
    missing_sysctls: &'a BTreeSet<String>,
    cells_dir: PathBuf,
    apply_patch: &'a Path,
    preparer: Mutex<subject::Preparer>,
    codex_copies: Mutex<super::codex::Copies>,
    /// Cells are running side by side now (their kernel-log windows overlap).
    side_by_side: AtomicBool,
}

impl Batch<'_> {
    /// How many cells may run at once: the guest's vCPUs, in a guest that loaded no security
    /// policy (whose audit lines decide a cell's signature and must be the cell's own); one
    /// anywhere else (a host's or container's batch is one of several the scheduler runs at
    /// once already).
    fn workers(&self) -> usize {
        if !super::init::is_guest_init() || !matches!(self.apparmor, Ok(None)) {
            return 1;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// A cell may run beside others when nothing it does reaches beyond its own directory: a
    /// bwrap cell whose scenario writes no absolute path. Codex cells (their process trees
    /// are walked, `system-bwrap = "hidden"` renames the guest's bwrap) run alone.
    fn may_run_beside_others(&self, i: usize) -> bool {
        let cell = &self.spec.cells[i];
        matches!(cell.subject, SubjectSpec::Bwrap { .. })
            && scenario::load(&cell.scenario_dir).is_ok_and(|sc| {
                sc.meta
                    .confinement
                    .as_ref()
                    .is_none_or(|c| c.outside.iter().all(|o| !Path::new(o).is_absolute()))
            })
    }

    /// Run `cells` on `workers` threads, writing their events as they come; returns how many
    /// finished. A signal stops new cells from starting; running ones end as in a serial run.
    fn run_side_by_side(
        &self,
        cells: &[usize],
        workers: usize,
        emit: &mut dyn FnMut(AgentEvent) -> Result<()>,
    ) -> Result<usize> {
        let next = AtomicUsize::new(0);
        let (tx, rx) = mpsc::channel::<AgentEvent>();
        self.side_by_side.store(true, Ordering::SeqCst);
        let done = std::thread::scope(|s| -> Result<usize> {
            for _ in 0..workers.min(cells.len()) {
                let tx = tx.clone();
                let next = &next;
                s.spawn(move || {
                    while !stopping() {
                        let Some(&i) = cells.get(next.fetch_add(1, Ordering::SeqCst)) else {
                            break;
                        };
                        let id = self.spec.cells[i].id.clone();
                        if tx.send(AgentEvent::CellStarted { id }).is_err() {
                            break;
                        }
                        if tx.send(AgentEvent::CellFinished(self.cell(i))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let mut done = 0;
            for ev in rx {
                let finished = matches!(ev, AgentEvent::CellFinished(_));
                emit(ev)?;
                done += usize::from(finished);
            }
            Ok(done)
        });
        self.side_by_side.store(false, Ordering::SeqCst);
        done
    }

    /// One cell, judged, with what the kernel said in its time; its directory is removed as
    /// soon as it is judged, so a long batch does not fill the disk.
    fn cell(&self, i: usize) -> CellRecord {
        let cell = &self.spec.cells[i];
        let ctx = CellCtx {
            spec: self.spec,
            cell,
            dir: self.cells_dir.join(i.to_string()),
            apply_patch: self.apply_patch,
        };
        let rec = if let Err(refused) = self.apparmor {
            match refused {
                super::lsm::Refused::Skip(why) => record(
                    cell,
                    Outcome::Skipped {
                        reason: why.clone(),
                    },
                ),
                super::lsm::Refused::Error(why) => error(cell, "apparmor", why),
            }
        } else if let Some(s) = cell
            .needs_sysctls
            .iter()
            .find(|s| self.missing_sysctls.contains(*s))
        {
            record(
                cell,
                Outcome::Skipped {
                    reason: format!("this kernel has no sysctl {s}"),
                },
            )
        } else if let Some(Err(e)) =
            matches!(self.apparmor, Ok(Some(_))).then(super::lsm::reset_audit_cache)
        {
            // Only under a loaded policy (its reset profile is loaded with it).
            error(cell, "apparmor", e)
        } else {
            super::kmsg::begin_cell();
            let mut rec = run_cell(&ctx, &self.preparer, &self.codex_copies);
            let settle =
                !matches!(rec.outcome, Outcome::Passed) || matches!(self.apparmor, Ok(Some(_)));
            if let Some(lines) = super::kmsg::lines(settle)
                && !lines.is_empty()
            {
                rec.details.insert("kernel.log".into(), lines.join("\n"));
                if self.side_by_side.load(Ordering::SeqCst) {
                    rec.details.insert(
                        "kernel.log.shared".into(),
                        "the cell ran beside others of its batch: a line of its time may be theirs"
                            .into(),
                    );
                }
            }
            if let Ok(Some((sets, loaded))) = self.apparmor {
                rec.details
                    .insert("apparmor.policy".into(), format!("{sets}: {loaded}"));
            }
            rec
        };
        let _ = fs::remove_dir_all(&ctx.dir);
        rec
    }
}

/// The batch's private directory; removed on drop (also after a signal, since the signal only
/// sets a flag and the loop returns here).
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(path: &Path) -> Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("failed to create {}", path.display()))?;
        // Readable by the cell's uid: its workspaces are inside, and bwrap 0.12 opens every
        // ancestor of a bind destination (with 0711 it fails "Can't mkdir parents ...:
        // Permission denied", seen in Debian trixie's build).
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        Ok(WorkDir {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn mkdir_mode(p: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(p).with_context(|| format!("failed to create {}", p.display()))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Write the batch's sysctls; returns the ones this kernel does not have.
fn apply_sysctls(
    sysctls: &BTreeMap<String, String>,
    emit: &mut dyn FnMut(AgentEvent) -> Result<()>,
) -> Result<BTreeSet<String>> {
    let mut missing = BTreeSet::new();
    for (k, v) in sysctls {
        let path = Path::new("/proc/sys").join(k.replace('.', "/"));
        if !path.exists() {
            emit(AgentEvent::Log {
                message: format!("sysctl {k} does not exist on this kernel"),
            })?;
            missing.insert(k.clone());
            continue;
        }
        fs::write(&path, v).with_context(|| format!("failed to set sysctl {k}={v}"))?;
        emit(AgentEvent::Log {
            message: format!("sysctl {k}={v}"),
        })?;
    }
    Ok(missing)
}

/// What the agent can tell about where it runs; the host stores it with the batch.
pub(crate) fn environment_facts() -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    if let Some(v) = read("/proc/sys/kernel/osrelease") {
        f.insert("kernel.osrelease".into(), v);
    }
    if let Some(v) = read("/proc/version") {
        f.insert("kernel.version".into(), v);
    }
    for k in [
        "user/max_user_namespaces",
        "kernel/unprivileged_userns_clone",
    ] {
        let key = k.replace('/', ".");
        f.insert(
            key,
            read(&format!("/proc/sys/{k}")).unwrap_or_else(|| "absent".into()),
        );
    }
    if let Some(status) = read("/proc/self/status") {
        for line in status.lines() {
            for k in [
                "CapEff",
                "CapBnd",
                "NoNewPrivs",
                "Seccomp",
                "Seccomp_filters",
            ] {
                if let Some(v) = line.strip_prefix(k).and_then(|r| r.strip_prefix(':')) {
                    f.insert(format!("agent.{k}"), v.trim().to_string());
                }
            }
        }
    }
    f.insert("agent.euid".into(), unsafe { libc::geteuid() }.to_string());
    if let Some(l) = apparmor_label() {
        f.insert("agent.apparmor".into(), l);
    }
    f
}

/// The AppArmor label the agent (and so every sandbox it starts) runs under, e.g.
/// `docker-default (enforce)`; `None` where AppArmor is not the active security module.
pub(crate) fn apparmor_label() -> Option<String> {
    [
        "/proc/self/attr/apparmor/current",
        "/proc/self/attr/current",
    ]
    .iter()
    .find_map(|p| fs::read_to_string(p).ok())
    .map(|s| s.trim_end_matches(['\0', '\n']).to_string())
    .filter(|s| !s.is_empty())
}

fn run_cell(
    ctx: &CellCtx,
    preparer: &Mutex<subject::Preparer>,
    codex_copies: &Mutex<super::codex::Copies>,
) -> CellRecord {
    let start = Instant::now();
    let run_codex = |version: &str, source| {
        let mut copies = codex_copies.lock().unwrap_or_else(|e| e.into_inner());
        super::codex::prepare_and_run_codex(ctx, &mut copies, version, source)
            .unwrap_or_else(|e| error(ctx.cell, "agent", format!("{e:#}")))
    };
    let mut rec = match ctx.cell.subject.clone() {
        SubjectSpec::Bwrap {
            build,
            setuid,
            argv,
        } => match prepare_and_run_bwrap(ctx, preparer, &build, setuid, argv) {
            Ok(r) => r,
            Err(e) => error(ctx.cell, "agent", format!("{e:#}")),
        },
        SubjectSpec::Codex {
            version,
            codex_bin,
            hide_system_bwrap,
            entry,
        } => {
            let hidden = if hide_system_bwrap {
                match HiddenSystemBwrap::hide() {
                    Ok(h) => Some(h),
                    Err(why) => return record(ctx.cell, Outcome::Skipped { reason: why }),
                }
            } else {
                None
            };
            let mut rec = run_codex(
                &version,
                super::codex::Source::Pinned(&codex_bin, entry.as_ref()),
            );
            if let Some(h) = hidden {
                rec.details
                    .insert("codex.system-bwrap".into(), h.describe());
            }
            rec
        }
        SubjectSpec::ImageCodex => match super::codex::find_image_codex() {
            Err(why) => record(
                ctx.cell,
                Outcome::Failed {
                    signature: "codex-missing".into(),
                    message: why,
                },
            ),
            Ok(codex) => {
                let version = super::codex::installed_version(&codex);
                run_codex(&version, super::codex::Source::Image(&codex))
            }
        },
    };
    rec.duration_ms = start.elapsed().as_millis() as u64;
    // A confined agent confines its sandboxes: the profile is evidence for what they hit.
    if let Some(l) = apparmor_label().filter(|l| l != "unconfined") {
        rec.details.insert("apparmor".into(), l);
    }
    rec
}

/// `/usr/bin/bwrap` renamed away for one cell, so that Codex finds no system bwrap and runs
/// its bundled one; renamed back when dropped. Only in a guest, whose root file system is the
/// agent's own and lives for one boot.
struct HiddenSystemBwrap {
    had: bool,
}

impl HiddenSystemBwrap {
    const SYSTEM: &'static str = "/usr/bin/bwrap";
    const ASIDE: &'static str = "/usr/bin/.bwrap-hidden-by-nsmatrix";

    fn hide() -> std::result::Result<Self, String> {
        if !super::init::is_guest_init() {
            return Err(format!(
                "system-bwrap = \"hidden\" needs a QEMU guest: elsewhere hiding {} would change a real system",
                Self::SYSTEM
            ));
        }
        let had = Path::new(Self::SYSTEM).exists();
        if had {
            fs::rename(Self::SYSTEM, Self::ASIDE)
                .map_err(|e| format!("failed to hide {}: {e}", Self::SYSTEM))?;
        }
        Ok(HiddenSystemBwrap { had })
    }

    fn describe(&self) -> String {
        if self.had {
            format!(
                "hidden: {} was renamed away while the cell ran",
                Self::SYSTEM
            )
        } else {
            format!("hidden: the guest has no {}", Self::SYSTEM)
        }
    }
}

impl Drop for HiddenSystemBwrap {
    fn drop(&mut self) {
        if self.had {
            let _ = fs::rename(Self::ASIDE, Self::SYSTEM);
        }
    }
}

fn prepare_and_run_bwrap(
    ctx: &CellCtx,
    preparer: &Mutex<subject::Preparer>,
    build: &str,
    setuid: crate::protocol::SetuidMode,
    profile: crate::protocol::ArgvProfile,
) -> Result<CellRecord> {
    let cell = ctx.cell;
    let sc = scenario::load(&cell.scenario_dir)
        .with_context(|| format!("failed to load scenario {}", cell.scenario_dir.display()))?;
    let prepared = preparer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .bwrap(build, setuid);
    let bw = match prepared {
        Ok(b) => b,
        Err(e) if e.is_missing() => {
            return Ok(record(
                cell,
                Outcome::Failed {
                    signature: "bwrap-missing".into(),
                    message: e.to_string(),
                },
            ));
        }
        Err(e) => return Err(anyhow::Error::new(e).context("failed to prepare the subject")),
    };
    let layout = lay_out(ctx, &sc)?;
    let patch = fs::read_to_string(sc.patch_path())
        .with_context(|| format!("failed to read {}", sc.patch_path().display()))?;
    let command = [
        ctx.apply_patch.as_os_str().to_os_string(),
        OsString::from(patch),
    ];
    let args = argv::build(profile, bw.features, &layout.ws, &command);

    let nnp = ctx.spec.restrictions.no_new_privileges || agent_has_nnp();
    // Setuid is observed, never inferred from the configuration: the cell's bwrap, started as
    // its uid under its restrictions, read in /proc (see observe.rs).
    let setuid_seen = (bw.setuid_bit && ctx.spec.uid != 0)
        .then(|| super::observe::probe_setuid_cached(ctx.spec, &bw.path));
    let setuid_evidence = match (&setuid_seen, bw.setuid_bit) {
        (Some(seen), _) => seen.describe(),
        (None, false) => "not in play: the bwrap file has no setuid bit".to_string(),
        (None, true) => "not in play: the cell runs as root".to_string(),
    };
    let mut details = BTreeMap::new();
    details.insert("bwrap.path".into(), bw.path.display().to_string());
    details.insert("bwrap.version".into(), bw.version.clone());
    details.insert("bwrap.setuid-bit".into(), bw.setuid_bit.to_string());
    details.insert(
        "bwrap.setuid-effective".into(),
        match setuid_seen.as_ref().and_then(|s| s.in_effect()) {
            Some(b) => b.to_string(),
            None if setuid_seen.is_none() => "false".to_string(),
            None => "unknown".to_string(),
        },
    );
    details.insert("bwrap.setuid-observed".into(), setuid_evidence.clone());
    details.insert("no-new-privileges".into(), nnp.to_string());
    let nesting = super::observe::probe_nesting_cached(ctx.spec);
    if let Some(n) = &nesting {
        details.insert("nesting.observed".into(), n.describe());
    }
    details.insert(
        "argv".into(),
        shell_words(&bw.path, &args[..args.len() - 1]) + " PATCH",
    );

    let run = run_sandboxed(ctx, &bw.path, &args, &layout.ws)?;
    let norm = |s: &str| scenario::normalise_output(s, &layout.ws);
    let mut rec = CellRecord {
        id: cell.id.clone(),
        outcome: Outcome::Passed,
        exit_code: run.code,
        duration_ms: 0,
        stdout_tail: tail(&norm(&run.stdout)),
        stderr_tail: tail(&norm(&run.stderr)),
        details,
    };
    // Renamed to setuid-ignored-nnp only when the probe saw the bit ignored.
    let ignored_seen = setuid_seen.as_ref().and_then(|s| s.in_effect()) == Some(false);
    let setuid_in_effect = setuid_seen.as_ref().and_then(|s| s.in_effect()) == Some(true);
    let (outcome, facts) = super::observe::judge_with_facts(
        |settle| super::observe::deny_facts(ctx.spec, setuid_in_effect, settle),
        |facts| {
            judge(
                &sc,
                &layout,
                &run,
                &norm,
                bw.setuid_bit && nnp && ctx.spec.uid != 0 && ignored_seen,
                facts,
            )
        },
        |o| matches!(o, Outcome::Failed { .. }),
    );
    rec.outcome = outcome;
    if matches!(rec.outcome, Outcome::Failed { .. }) {
        rec.details
            .insert("signature.facts".into(), facts.describe());
    }
    if rec.outcome == Outcome::Passed {
        let mut ev = super::observe::Evidence::default();
        super::judge::passed_evidence(&sc, &mut ev);
        ev.set("setuid", setuid_evidence);
        if let Some(n) = &nesting {
            ev.set("nesting", n.describe());
        }
        ev.set(
            "sandbox",
            format!(
                "bwrap started by the agent itself ({}), exit code {:?}",
                bw.path.display(),
                run.code
            ),
        );
        ev.write_into(&mut rec.details);
    }
    for t in &layout.absolute_targets {
        remove_any(t);
    }
    Ok(rec)
}

fn run_sandboxed(ctx: &CellCtx, bwrap: &Path, args: &[OsString], ws: &Path) -> Result<RunOutput> {
    run_program(ctx, bwrap, args, ws, &[], None)
}
