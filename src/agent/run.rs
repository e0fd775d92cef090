//! [`run_batch`]: every cell of a batch, inside its environment, one after another.
//!
//! Per cell: lay the scenario out in a fresh workspace owned by the cell's uid, prepare the
//! subject, run the sandbox with `apply_patch` inside under the batch's restrictions, then
//! judge what came back: sandbox signature, exit code, output, tree, sentinel. The agent knows
//! nothing of Docker or QEMU and nothing of the matrix's expectations.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::judge::judge;
use crate::agent::protocol::{
    AgentEvent, BatchSpec, CellRecord, CellSpec, Outcome, PROTOCOL_VERSION, SubjectSpec,
};
use crate::sandbox::{argv, restrict, subject};
use crate::scenario::{self, Scenario};

/// Bytes of stdout/stderr kept per cell.
pub const TAIL_BYTES: usize = 4096;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag: the running cell's sandbox is killed, the batch's directory is
/// removed, and the agent exits. Installed without SA_RESTART so a blocking wait returns.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Run a whole batch, writing [`AgentEvent`] lines to `out`. The batch's `work_dir` is removed
/// at the end whatever happens.
pub fn run_batch(spec: &BatchSpec, out: &mut dyn Write) -> Result<()> {
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
    let work = WorkDir::create(&spec.work_dir)?;
    let bin_dir = work.path.join("bin");
    mkdir_mode(&bin_dir, 0o755)?;
    let apply_patch = bin_dir.join("apply_patch");
    std::os::unix::fs::symlink(&spec.agent_bin, &apply_patch)
        .with_context(|| format!("failed to link {}", apply_patch.display()))?;
    let mut preparer = subject::Preparer::new(work.path.join("subjects"));
    let mut codex_copies = super::codex::Copies::new(work.path.join("codex"));
    let mut done = 0;
    for (i, cell) in spec.cells.iter().enumerate() {
        if stopping() {
            break;
        }
        emit(AgentEvent::CellStarted {
            id: cell.id.clone(),
        })?;
        let ctx = CellCtx {
            spec,
            cell,
            dir: work.path.join("cells").join(i.to_string()),
            apply_patch: &apply_patch,
        };
        let rec = if let Some(s) = cell
            .needs_sysctls
            .iter()
            .find(|s| missing_sysctls.contains(*s))
        {
            record(
                cell,
                Outcome::Skipped {
                    reason: format!("this kernel has no sysctl {s}"),
                },
            )
        } else {
            run_cell(&ctx, &mut preparer, &mut codex_copies)
        };
        // A cell's directory is removed as soon as it is judged, so a long batch does not fill
        // the disk; the whole work dir goes at the end anyway.
        let _ = fs::remove_dir_all(&ctx.dir);
        emit(AgentEvent::CellFinished(rec))?;
        done += 1;
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
pub fn environment_facts() -> BTreeMap<String, String> {
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
            for k in ["CapBnd", "NoNewPrivs", "Seccomp"] {
                if let Some(v) = line.strip_prefix(k).and_then(|r| r.strip_prefix(':')) {
                    f.insert(format!("agent.{k}"), v.trim().to_string());
                }
            }
        }
    }
    f.insert("agent.euid".into(), unsafe { libc::geteuid() }.to_string());
    f
}

pub(super) struct CellCtx<'a> {
    pub(super) spec: &'a BatchSpec,
    pub(super) cell: &'a CellSpec,
    pub(super) dir: PathBuf,
    pub(super) apply_patch: &'a Path,
}

pub(super) fn record(cell: &CellSpec, outcome: Outcome) -> CellRecord {
    CellRecord::outcome_only(&cell.id, outcome)
}

fn error(cell: &CellSpec, stage: &str, e: impl std::fmt::Display) -> CellRecord {
    record(
        cell,
        Outcome::Error {
            stage: stage.into(),
            message: e.to_string(),
        },
    )
}

fn run_cell(
    ctx: &CellCtx,
    preparer: &mut subject::Preparer,
    codex_copies: &mut super::codex::Copies,
) -> CellRecord {
    let start = Instant::now();
    let mut rec = match ctx.cell.subject.clone() {
        SubjectSpec::Bwrap {
            build,
            setuid,
            argv,
        } => match prepare_and_run_bwrap(ctx, preparer, &build, setuid, argv) {
            Ok(r) => r,
            Err(e) => error(ctx.cell, "agent", format!("{e:#}")),
        },
        SubjectSpec::Codex { version, codex_bin } => {
            match super::codex::prepare_and_run_codex(ctx, codex_copies, &version, &codex_bin) {
                Ok(r) => r,
                Err(e) => error(ctx.cell, "agent", format!("{e:#}")),
            }
        }
    };
    rec.duration_ms = start.elapsed().as_millis() as u64;
    rec
}

/// The workspace and sentinel of one cell: `<cell>/ws` and `<cell>/outside/sentinel.txt`, all
/// owned by the cell's uid so that only the sandbox stands between a patch and the outside.
pub(super) struct Layout {
    pub(super) ws: PathBuf,
    pub(super) sentinel: PathBuf,
    pub(super) outside_dir: PathBuf,
    /// Absolute paths a confinement scenario tries to write (removed before and after).
    pub(super) absolute_targets: Vec<PathBuf>,
    pub(super) before_outside: BTreeSet<String>,
}

/// The same text the scenarios (and the differential tests) lay out, so a patch aimed at the
/// sentinel matches its context and the only thing that can stop the write is the sandbox.
pub(super) const SENTINEL_TEXT: &str = "sentinel\n";

pub(super) fn lay_out(ctx: &CellCtx, sc: &Scenario) -> Result<Layout> {
    let (uid, gid) = (ctx.spec.uid, ctx.spec.gid);
    let ws = ctx.dir.join("ws");
    let outside_dir = ctx.dir.join("outside");
    fs::create_dir_all(&ws).with_context(|| format!("failed to create {}", ws.display()))?;
    fs::create_dir_all(&outside_dir)?;
    sc.materialise(&ws)
        .with_context(|| format!("failed to lay out scenario {}", sc.name))?;
    let sentinel = outside_dir.join("sentinel.txt");
    fs::write(&sentinel, SENTINEL_TEXT)?;
    chown_tree(&ctx.dir, uid, gid)?;
    let mut absolute_targets = Vec::new();
    if let Some(c) = &sc.meta.confinement {
        for o in &c.outside {
            let p = Path::new(o);
            if p.is_absolute() {
                remove_any(p);
                absolute_targets.push(p.to_path_buf());
            }
        }
    }
    let before_outside = list_outside(&ctx.dir);
    Ok(Layout {
        ws,
        sentinel,
        outside_dir,
        absolute_targets,
        before_outside,
    })
}

pub(super) fn remove_any(p: &Path) {
    if fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
        let _ = fs::remove_dir_all(p);
    } else {
        let _ = fs::remove_file(p);
    }
}

/// Everything under the cell's directory except the workspace: an escape shows up here.
pub(super) fn list_outside(cell_dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            if rel == "ws" {
                continue;
            }
            out.insert(rel);
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &p, out);
            }
        }
    }
    walk(cell_dir, cell_dir, &mut out);
    out
}

fn chown_tree(p: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .with_context(|| format!("failed to chown {}", p.display()))?;
    if fs::symlink_metadata(p)?.is_dir() {
        for e in fs::read_dir(p)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn prepare_and_run_bwrap(
    ctx: &CellCtx,
    preparer: &mut subject::Preparer,
    build: &str,
    setuid: crate::agent::protocol::SetuidMode,
    profile: crate::agent::protocol::ArgvProfile,
) -> Result<CellRecord> {
    let cell = ctx.cell;
    let sc = scenario::load(&cell.scenario_dir)
        .with_context(|| format!("failed to load scenario {}", cell.scenario_dir.display()))?;
    let bw = match preparer.bwrap(build, setuid) {
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
    rec.outcome = judge(
        &sc,
        &layout,
        &run,
        &norm,
        bw.setuid_bit && nnp && ctx.spec.uid != 0 && ignored_seen,
    );
    if rec.outcome == Outcome::Passed {
        let mut ev = super::observe::Evidence::default();
        super::judge::passed_evidence(&sc, &mut ev);
        ev.set("setuid", setuid_evidence);
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

pub(super) fn agent_has_nnp() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("NoNewPrivs:") && l.trim_end().ends_with('1'))
        })
        .unwrap_or(false)
}

pub(super) struct RunOutput {
    pub(super) code: Option<i32>,
    pub(super) signal: Option<i32>,
    pub(super) timed_out: bool,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

fn run_sandboxed(ctx: &CellCtx, bwrap: &Path, args: &[OsString], ws: &Path) -> Result<RunOutput> {
    run_program(ctx, bwrap, args, ws, &[], None)
}

/// Run `program` for a cell: as its uid, under the batch's restrictions, in its own process
/// group, stdout/stderr to files, within the cell's timeout. `observe` is called with the
/// child's pid every few milliseconds while it runs.
pub(super) fn run_program(
    ctx: &CellCtx,
    program: &Path,
    args: &[OsString],
    ws: &Path,
    env: &[(&str, &Path)],
    observe: Option<&mut dyn FnMut(u32)>,
) -> Result<RunOutput> {
    let prepared = restrict::Prepared::new(&ctx.spec.restrictions, ctx.spec.uid, ctx.spec.gid)?;
    let out_path = ctx.dir.join("stdout");
    let err_path = ctx.dir.join("stderr");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(ws)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", ws)
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    prepared.apply_to(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("failed to start {}", program.display()))?;
    let (status, timed_out) =
        wait_timeout(child, Duration::from_millis(ctx.cell.timeout_ms), observe)?;
    if stopping() && status.is_none() {
        anyhow::bail!("interrupted");
    }
    let read = |p: &Path| {
        let mut s = Vec::new();
        let _ = fs::File::open(p).and_then(|mut f| f.read_to_end(&mut s));
        String::from_utf8_lossy(&s).into_owned()
    };
    Ok(RunOutput {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        stdout: read(&out_path),
        stderr: read(&err_path),
    })
}

/// Wait for the child's process group with a deadline, waking up on signals. On timeout or
/// interruption the whole group is killed.
fn wait_timeout(
    mut child: Child,
    timeout: Duration,
    mut observe: Option<&mut dyn FnMut(u32)>,
) -> io::Result<(Option<std::process::ExitStatus>, bool)> {
    let deadline = Instant::now() + timeout;
    let pid = child.id() as libc::pid_t;
    // pidfd_open (Linux 5.3+) lets us sleep until the child exits; older kernels poll.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    loop {
        if let Some(st) = child.try_wait()? {
            if pidfd >= 0 {
                unsafe { libc::close(pidfd) };
            }
            return Ok((Some(st), false));
        }
        let now = Instant::now();
        if now >= deadline || stopping() {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let st = child.wait()?;
            if pidfd >= 0 {
                unsafe { libc::close(pidfd) };
            }
            return Ok((if stopping() { None } else { Some(st) }, !stopping()));
        }
        let mut left = (deadline - now).as_millis().min(1000) as libc::c_int;
        if let Some(f) = observe.as_mut() {
            f(pid as u32);
            left = left.min(2);
        }
        if pidfd >= 0 {
            let mut pfd = libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            };
            unsafe { libc::poll(&mut pfd, 1, left.max(1)) };
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The last [`TAIL_BYTES`] of `s`, cut at a char boundary.
pub fn tail(s: &str) -> String {
    if s.len() <= TAIL_BYTES {
        return s.to_string();
    }
    let mut i = s.len() - TAIL_BYTES;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    format!("…{}", &s[i..])
}

fn shell_words(bin: &Path, args: &[OsString]) -> String {
    let mut s = bin.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_cuts_on_char_boundaries() {
        let s = "é".repeat(TAIL_BYTES);
        let t = tail(&s);
        assert!(t.len() <= TAIL_BYTES + 4);
        assert!(t.starts_with('…'));
        assert_eq!(tail("short"), "short");
    }

    #[test]
    fn outside_listing_ignores_workspace() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("ws/a")).unwrap();
        fs::create_dir_all(d.path().join("outside")).unwrap();
        fs::write(d.path().join("outside/sentinel.txt"), "x").unwrap();
        let l = list_outside(d.path());
        assert_eq!(
            l.into_iter().collect::<Vec<_>>(),
            vec!["outside", "outside/sentinel.txt"]
        );
    }
}
