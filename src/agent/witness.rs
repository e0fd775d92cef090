//! The sandbox witness: proof that a Codex cell's command really ran inside a sandbox.
//!
//! The command Codex is asked to run in its sandbox is `nsmatrix-sandbox-witness codex
//! --codex-run-as-apply-patch PATCH` (a symlink to this binary). The witness catches SIGUSR1
//! and waits for it; the agent, polling Codex's process tree, finds the waiting witness (its
//! executable is the agent's own, its SigCgt has SIGUSR1), records its ancestry (the bwrap
//! that started it) and its namespaces against the agent's, and releases it; the witness then
//! execs the real command. Nothing can pass without being released, and the agent cannot miss
//! a sandbox that lives only a few milliseconds: the witness waits for it. A witness nobody
//! releases gives up after [`WAIT`] with exit code 125.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

/// The name the witness is started by.
pub const NAME: &str = "nsmatrix-sandbox-witness";
/// How long a witness waits to be released.
pub const WAIT: Duration = Duration::from_secs(20);

static RELEASED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    RELEASED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The witness's main: wait for SIGUSR1, then exec `args`. Never returns on success.
///
/// A handler is installed first (the agent signals only once /proc shows it in SigCgt, so an
/// early signal cannot kill the witness), then SIGUSR1 is blocked and waited for.
pub fn main(args: &[OsString]) -> u8 {
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let ts = libc::timespec {
            tv_sec: WAIT.as_secs() as libc::time_t,
            tv_nsec: 0,
        };
        let released = RELEASED.load(std::sync::atomic::Ordering::SeqCst)
            || libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) == libc::SIGUSR1;
        if !released {
            eprintln!("{NAME}: not released by the nsmatrix agent within {WAIT:?}");
            return 125;
        }
        // The exec'd command starts with an empty mask and the default action, as it would
        // have without us.
        libc::signal(libc::SIGUSR1, libc::SIG_DFL);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    let Some((prog, rest)) = args.split_first() else {
        eprintln!("{NAME}: no command");
        return 125;
    };
    let err = std::process::Command::new(prog).args(rest).exec();
    eprintln!("{NAME}: failed to run {}: {err}", Path::new(prog).display());
    127
}

/// What the agent saw of a released witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub pid: u32,
    /// Executables of its ancestors up to (not including) the process the agent started.
    pub ancestors: Vec<String>,
    /// Namespaces (`mnt`, `user`, `pid`, `net`) in which the witness differs from the agent.
    pub own_namespaces: Vec<&'static str>,
}

impl Seen {
    /// A bwrap among its ancestors.
    pub fn bwrap(&self) -> Option<&str> {
        self.ancestors.iter().map(String::as_str).find(|e| {
            Path::new(e.trim_end_matches(" (deleted)"))
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("bwrap"))
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "observed: the witness (pid {}) ran under {} in its own {} namespace(s)",
            self.pid,
            if self.ancestors.is_empty() {
                "the process the agent started (a direct child)".to_string()
            } else {
                self.ancestors.join(" < ")
            },
            if self.own_namespaces.is_empty() {
                "(none!)".to_string()
            } else {
                self.own_namespaces.join(", ")
            }
        )
    }
}

/// Release a waiting witness (see [`is_waiting`]).
pub fn release(seen: &Seen) {
    unsafe { libc::kill(seen.pid as libc::pid_t, libc::SIGUSR1) };
}

/// The file identity (device, inode) of the agent's binary, to know a witness by.
pub fn identity(agent_bin: &Path) -> Option<(u64, u64)> {
    fs::metadata(agent_bin).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether `pid` is a witness waiting to be released: started under the witness's name
/// (`argv0`, the first word of its command line, already read by the caller), running the
/// agent's binary (`agent`, from [`identity`]), with its SIGUSR1 handler in place.
pub fn is_waiting(pid: u32, argv0: &[u8], agent: (u64, u64)) -> bool {
    Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(argv0))
        .file_name()
        .is_some_and(|n| n == NAME)
        && fs::metadata(format!("/proc/{pid}/exe")).is_ok_and(|m| (m.dev(), m.ino()) == agent)
        && usr1_caught(pid)
}

/// What is seen of the waiting witness `pid`, found in `tree` (the processes below `root` with
/// their parents, from [`descendants`]); the caller then [`release`]s it.
pub fn seen_in(pid: u32, root: u32, tree: &[(u32, u32)]) -> Seen {
    let parent: HashMap<u32, u32> = tree.iter().copied().collect();
    let mut ancestors = Vec::new();
    let mut p = parent.get(&pid).copied();
    // Namespaces are compared with the agent's, or with the outer sandbox's when the agent put
    // one around the cell: a namespace of the outer sandbox is not the cell's own.
    let mut reference = "self".to_string();
    while let Some(a) = p {
        if a == root {
            break;
        }
        if super::observe::is_outer_sandbox(a) {
            reference = a.to_string();
            break;
        }
        let exe = fs::read_link(format!("/proc/{a}/exe"))
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        ancestors.push(exe);
        p = parent.get(&a).copied();
    }
    let own_namespaces = ["mnt", "user", "pid", "net"]
        .into_iter()
        .filter(|ns| {
            let a = fs::read_link(format!("/proc/{reference}/ns/{ns}")).ok();
            let b = fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
            a.is_some() && b.is_some() && a != b
        })
        .collect();
    Seen {
        pid,
        ancestors,
        own_namespaces,
    }
}

/// Every process below `root` with its parent, found from `root` down through
/// `/proc/PID/task/TID/children`; a kernel without them (CONFIG_PROC_CHILDREN off, as in
/// small kernels) gets one pass over every process's parent in `/proc`.
pub fn descendants(root: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        let Some(kids) = children(p) else {
            return descendants_by_scan(root);
        };
        for child in kids {
            out.push((child, p));
            stack.push(child);
        }
    }
    out
}

/// `None` when the kernel has no `children` files (or `pid` is gone).
fn children(pid: u32) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut any = false;
    for t in tasks.flatten() {
        if let Ok(s) = fs::read_to_string(t.path().join("children")) {
            any = true;
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    any.then_some(out)
}

fn descendants_by_scan(root: u32) -> Vec<(u32, u32)> {
    let parent: HashMap<u32, u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    below(root, &parent)
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the command name, which may
/// hold spaces, in parentheses).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The processes of `parent` (each process's parent) below `root`, with their parents, in
/// the order of their pids (the order they started in, short of a wrap).
pub fn below(root: u32, parent: &HashMap<u32, u32>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = parent
        .iter()
        .filter(|&(&pid, _)| {
            let mut p = pid;
            for _ in 0..64 {
                match parent.get(&p) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 && pp != p => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .map(|(&pid, &ppid)| (pid, ppid))
        .collect();
    out.sort_unstable();
    out
}

/// Run `f` with the file-system uid and gid of `uid`/`gid` (when this process is root and
/// `uid` is not): a process's `/proc` links (`exe`, `ns/*`) are readable to its own uid and
/// gid, and to root only with CAP_SYS_PTRACE, which a container's root lacks under Docker's
/// defaults.
pub fn as_fsuid<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: setfsuid(2)/setfsgid(2) change only this thread's file-system ids, and they
    // are put back.
    unsafe {
        if uid == 0 || libc::geteuid() != 0 {
            return f();
        }
        let gid_before = libc::setfsgid(gid) as u32;
        let uid_before = libc::setfsuid(uid) as u32;
        let out = f();
        libc::setfsuid(uid_before);
        libc::setfsgid(gid_before);
        out
    }
}

/// The witness has its SIGUSR1 handler: a signal now releases it, never kills it.
fn usr1_caught(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (libc::SIGUSR1 - 1)) != 0)
}
