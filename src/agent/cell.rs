//! What every subject's cell needs: its context, its workspace and sentinel, and running a
//! program as the cell's uid under the batch's restrictions with a timeout (a stop flag set by
//! SIGINT/SIGTERM ends it early).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::protocol::{BatchSpec, CellRecord, CellSpec, Outcome};
use crate::sandbox::restrict;
use crate::scenario::Scenario;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag: the running cell's sandbox is killed, the batch's directory is
/// removed, and the agent exits. Installed without SA_RESTART so a blocking wait returns.
pub(super) fn install_signal_handlers() {
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

pub(super) fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
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

pub(super) fn error(cell: &CellSpec, stage: &str, e: impl std::fmt::Display) -> CellRecord {
    record(
        cell,
        Outcome::Error {
            stage: stage.into(),
            message: e.to_string(),
        },
    )
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

/// Something that looks at a cell's process tree while it runs (a Codex cell's: the bwraps
/// Codex starts, the sandbox witness).
pub(super) trait Watch {
    /// Look at the tree below `root` (the child's pid); returns when to look again at the
    /// latest.
    fn look(&mut self, root: u32) -> Duration;
    /// A descriptor that becomes readable when there is something to look at sooner.
    fn wake_fd(&self) -> Option<RawFd>;
}

/// Run `program` for a cell: as its uid, under the batch's restrictions, in its own process
/// group, stdout/stderr to files, within the cell's timeout. `watch` looks at the child's
/// process tree while it runs, as often as it asks.
pub(super) fn run_program(
    ctx: &CellCtx,
    program: &Path,
    args: &[OsString],
    ws: &Path,
    env: &[(&str, &Path)],
    watch: Option<&mut dyn Watch>,
) -> Result<RunOutput> {
    let prepared = restrict::Prepared::new(&ctx.spec.restrictions, ctx.spec.uid, ctx.spec.gid)?;
    let out_path = ctx.dir.join("stdout");
    let err_path = ctx.dir.join("stderr");
    let (program, args) = restrict::wrap_outer(&ctx.spec.restrictions, program, args)?;
    let mut cmd = Command::new(&program);
    cmd.args(&args)
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
    let child = crate::sandbox::subject::spawn_copied(&mut cmd)
        .with_context(|| format!("failed to start {}", program.display()))?;
    let (status, timed_out) =
        wait_timeout(child, Duration::from_millis(ctx.cell.timeout_ms), watch)?;
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
    mut watch: Option<&mut dyn Watch>,
) -> io::Result<(Option<std::process::ExitStatus>, bool)> {
    let deadline = Instant::now() + timeout;
    let pid = child.id() as libc::pid_t;
    // pidfd_open (Linux 5.3+) lets us sleep until the child exits; older kernels poll.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    let close = || {
        if pidfd >= 0 {
            unsafe { libc::close(pidfd) };
        }
    };
    loop {
        if let Some(st) = child.try_wait()? {
            close();
            return Ok((Some(st), false));
        }
        let now = Instant::now();
        if now >= deadline || stopping() {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let st = child.wait()?;
            close();
            return Ok((if stopping() { None } else { Some(st) }, !stopping()));
        }
        let mut left = (deadline - now).min(Duration::from_secs(1));
        let mut wake = None;
        if let Some(w) = watch.as_mut() {
            left = left.min(w.look(pid as u32));
            wake = w.wake_fd();
        }
        let left = if pidfd >= 0 {
            left
        } else {
            left.min(Duration::from_millis(2))
        };
        let mut fds: Vec<libc::pollfd> = [pidfd, wake.unwrap_or(-1)]
            .into_iter()
            .filter(|&fd| fd >= 0)
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = left.as_millis().max(1) as libc::c_int;
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(ms as u64));
        } else {
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        }
    }
}

pub(super) fn shell_words(bin: &Path, args: &[OsString]) -> String {
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
