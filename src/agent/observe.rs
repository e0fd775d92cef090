//! Properties of a cell observed, not configured: whether the kernel really gave a bwrap its
//! setuid bit ([`probe_setuid`]) and the evidence a verdict rests on ([`Evidence`], written
//! into a record's details as `evidence.*`, which the host folds into the result).
//!
//! The setuid probe starts the cell's own bwrap under the cell's uid and restrictions with
//! `--args FD`, FD a pipe nothing is written to: bwrap parses its arguments right after it
//! acquires its privileges and before it creates any namespace or drops them, so it blocks
//! in that read with the credentials the kernel gave it at exec. Its `Uid:` line in
//! /proc/PID/status is then read and the probe killed. Deterministic, no race with a fast
//! sandbox, and nothing of the measured run is changed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::protocol::BatchSpec;
use crate::sandbox::{restrict, signature};

/// What the probe saw of a bwrap started as the cell's uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetuidSeen {
    /// Blocked in its argument read with these real and effective uids.
    Ids { ruid: u32, euid: u32, pid: u32 },
    /// It exited before it blocked (e.g. a build that refuses setuid), with this text.
    Exited(String),
    /// The probe could not run or read /proc.
    Unknown(String),
}

impl SetuidSeen {
    /// The kernel honoured the setuid bit: effective uid 0 for a non-root caller.
    pub fn in_effect(&self) -> Option<bool> {
        match self {
            SetuidSeen::Ids { ruid, euid, .. } => Some(*euid == 0 && *ruid != 0),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            SetuidSeen::Ids { ruid, euid, pid } => format!(
                "observed: bwrap pid {pid} ran with ruid {ruid}, euid {euid} ({})",
                if *euid == 0 && *ruid != 0 {
                    "setuid in effect"
                } else {
                    "setuid not in effect"
                }
            ),
            SetuidSeen::Exited(t) => format!("observed: bwrap exited before it could be read: {t}"),
            SetuidSeen::Unknown(e) => format!("not observed: {e}"),
        }
    }
}

/// Start `bwrap` as the batch's uid under its restrictions, blocked in `--args FD`, and read
/// its credentials.
pub fn probe_setuid(spec: &BatchSpec, bwrap: &Path) -> SetuidSeen {
    let prepared = match restrict::Prepared::new(&spec.restrictions, spec.uid, spec.gid) {
        Ok(p) => p,
        Err(e) => return SetuidSeen::Unknown(format!("restrictions: {e}")),
    };
    let mut fds = [0 as libc::c_int; 2];
    // Both ends close on exec; the child gets the read end as fd 3 below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return SetuidSeen::Unknown(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let (rd, wr) = (fds[0], fds[1]);
    // Inside the batch's outer sandbox, if it has one: the bwrap the probe reads is then the
    // one below it, not the outer one.
    let args = [OsString::from("--args"), OsString::from("3")];
    let (program, args) = match restrict::wrap_outer(&spec.restrictions, bwrap, &args) {
        Ok(w) => w,
        Err(e) => return SetuidSeen::Unknown(format!("restrictions: {e}")),
    };
    let mut cmd = probe_command(&program, &args);
    // SAFETY: dup2 and fcntl only.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it explicitly.
            if libc::dup2(rd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    prepared.apply_to(&mut cmd);
    let child = crate::sandbox::subject::spawn_copied(&mut cmd);
    unsafe { libc::close(rd) };
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            unsafe { libc::close(wr) };
            return SetuidSeen::Unknown(format!("failed to start {}: {e}", bwrap.display()));
        }
    };
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let seen = loop {
        if let Ok(Some(_)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            break SetuidSeen::Exited(err.lines().next().unwrap_or("").trim().to_string());
        }
        let candidates: Vec<u32> = if spec.restrictions.outer_bwrap {
            super::witness::descendants(pid)
                .into_iter()
                .map(|(p, _)| p)
                .filter(|p| !is_outer_sandbox(*p))
                .collect()
        } else {
            vec![pid]
        };
        if let Some(ids) = candidates
            .into_iter()
            .find_map(|p| blocked_in_read(p, bwrap))
        {
            break ids;
        }
        if Instant::now() >= deadline {
            break SetuidSeen::Unknown(
                "bwrap did not block in its argument read within 5 s".into(),
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
        libc::close(wr);
    }
    let _ = child.wait();
    seen
}

/// The probe's ids once it runs `bwrap` (exec done) and sleeps (blocked in its read).
fn blocked_in_read(pid: u32, bwrap: &Path) -> Option<SetuidSeen> {
    // Exec done: the task's name is the bwrap file's (first 15 bytes). /proc/PID/exe would need
    // ptrace access, which root without CAP_SYS_PTRACE (a container) lacks for another uid.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let name = bwrap.file_name()?.to_string_lossy();
    let want: String = name.chars().take(15).collect();
    if comm.trim_end_matches('\n') != want {
        return None;
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let state = status.lines().find(|l| l.starts_with("State:"))?;
    if !state.contains("S (sleeping)") {
        return None;
    }
    let ids: Vec<u32> = status
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (ids.len() >= 2).then(|| SetuidSeen::Ids {
        ruid: ids[0],
        euid: ids[1],
        pid,
    })
}

/// What a verdict rests on, written into a record's details as `evidence.KEY`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    pub items: BTreeMap<&'static str, String>,
}

impl Evidence {
    pub fn set(&mut self, key: &'static str, value: impl Into<String>) {
        self.items.insert(key, value.into());
    }

    /// Into a record's details.
    pub fn write_into(&self, details: &mut BTreeMap<String, String>) {
        for (k, v) in &self.items {
            details.insert(format!("evidence.{k}"), v.clone());
        }
    }
}

/// The facts that tell the members of a signature family apart (see
/// `signature::refine`), observed for the process tree that runs a cell's sandbox: the agent's
/// own /proc/self/status (its seccomp mode and filters, effective and bounding capabilities)
/// and kernel.unprivileged_userns_clone, combined with what the agent itself adds for the cell
/// (its seccomp filter, bounding set). `privileged` says the bwrap ran with euid 0: as root,
/// or with its setuid bit observed in effect. `settle`: wait for the kernel's late log lines
/// before reading whether AppArmor denied something (see [`judge_with_facts`]).
pub fn deny_facts(spec: &BatchSpec, privileged_setuid: bool, settle: bool) -> signature::Facts {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(k)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        })
    };
    let filtered_here = match (field("Seccomp"), field("Seccomp_filters")) {
        (Some(mode), filters) => Some(
            mode == "2"
                || filters
                    .and_then(|f| f.parse::<u32>().ok())
                    .is_some_and(|n| n > 0),
        ),
        (None, _) => None,
    };
    let seccomp_filter = if spec.restrictions.seccomp_deny_userns {
        Some(true)
    } else {
        filtered_here
    };
    let unprivileged_userns_clone =
        fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
            .ok()
            .and_then(|v| match v.trim() {
                "0" => Some(false),
                "1" => Some(true),
                _ => None,
            });
    // The capability set a privileged bwrap starts with: a root agent's effective set for a
    // root cell, the bounding set for a setuid one; both within the cell's bounding set.
    let agent_root = unsafe { libc::geteuid() } == 0;
    let set = if spec.uid == 0 && agent_root {
        field("CapEff")
    } else if spec.uid != 0 && privileged_setuid {
        field("CapBnd")
    } else {
        None
    }
    .and_then(|hex| u64::from_str_radix(&hex, 16).ok());
    let has = |name: &str| {
        let n = restrict::cap_number(name)?;
        let kept = spec
            .restrictions
            .bounding_set
            .as_ref()
            .is_none_or(|keep| keep.iter().any(|c| restrict::cap_number(c) == Some(n)));
        set.map(|bits| kept && bits & (1u64 << n) != 0)
    };
    let nesting = probe_nesting_cached(spec);
    signature::Facts {
        seccomp_filter,
        unprivileged_userns_clone,
        sys_admin: has("sys_admin"),
        net_admin: has("net_admin"),
        userns_depth: nesting.as_ref().and_then(|n| n.depth),
        outer_disable_userns: nesting.as_ref().and_then(|n| n.outer_disable_userns),
        apparmor_denied: super::kmsg::lines(settle)
            .map(|lines| lines.iter().any(|l| l.contains("apparmor=\"DENIED\""))),
    }
}

/// Judge a cell with the facts observed for it, waiting for the kernel's late log lines only
/// when a failure needs them. The facts only choose among failure signatures, so a judgement
/// that passes with the facts at hand is final; one that fails is made again with the facts
/// read after the log has settled (which the record then shows).
pub(super) fn judge_with_facts<T>(
    facts: impl Fn(bool) -> signature::Facts,
    decide: impl Fn(&signature::Facts) -> T,
    failed: impl Fn(&T) -> bool,
) -> (T, signature::Facts) {
    let quick = facts(false);
    let first = decide(&quick);
    if !failed(&first) {
        return (first, quick);
    }
    let settled = facts(true);
    (decide(&settled), settled)
}

/// Whether `pid` is the outer sandbox the agent put around a cell (its command line carries
/// the marker), not a bwrap the cell runs.
pub fn is_outer_sandbox(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|b| {
        b.split(|&c| c == 0)
            .any(|a| a == restrict::OUTER_MARKER.as_bytes())
    })
}

/// `ioctl(NS_GET_PARENT)` (linux/nsfs.h).
const NS_GET_PARENT: libc::c_ulong = 0xb702;

/// How many user namespaces `pid`'s lies below the agent's: its /proc/PID/ns/user walked up
/// with NS_GET_PARENT until the kernel refuses (at the initial namespace, or at the agent's
/// own: a parent outside the caller's namespace is not given out).
pub fn userns_depth(pid: u32) -> Option<u32> {
    use std::os::fd::IntoRawFd;
    let mut fd = fs::File::open(format!("/proc/{pid}/ns/user"))
        .ok()?
        .into_raw_fd();
    let mut depth = 0;
    loop {
        let parent = unsafe { libc::ioctl(fd, NS_GET_PARENT as _) };
        unsafe { libc::close(fd) };
        if parent < 0 || depth > 64 {
            break;
        }
        depth += 1;
        fd = parent;
    }
    Some(depth)
}

/// What the nesting probe saw: the process a cell's program runs as, started exactly as a
/// cell's (the batch's uid, restrictions and outer sandbox), read in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nesting {
    /// User namespaces between the agent's and the program's.
    pub depth: Option<u32>,
    /// Its ancestors up to the process the agent started: `comm(pid)`, the outer sandbox's
    /// with the flags that matter.
    pub chain: Vec<String>,
    /// An outer bwrap with `--disable-userns` was seen above it (`None`: no outer sandbox).
    pub outer_disable_userns: Option<bool>,
    pub error: Option<String>,
}

impl Nesting {
    pub fn describe(&self) -> String {
        if let Some(e) = &self.error {
            return format!("not observed: {e}");
        }
        format!(
            "observed: the cell's program starts {} user namespace(s) below the agent's (NS_GET_PARENT from /proc/PID/ns/user){}",
            self.depth
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into()),
            if self.chain.is_empty() {
                String::new()
            } else {
                format!(", under {}", self.chain.join(" < "))
            }
        )
    }
}

/// Start `sleep` as a cell's program would be started (uid, restrictions, outer sandbox) and
/// read where it runs: its user-namespace depth and the processes above it.
pub fn probe_nesting(spec: &BatchSpec) -> Nesting {
    let fail = |e: String| Nesting {
        depth: None,
        chain: Vec::new(),
        outer_disable_userns: None,
        error: Some(e),
    };
    let prepared = match restrict::Prepared::new(&spec.restrictions, spec.uid, spec.gid) {
        Ok(p) => p,
        Err(e) => return fail(format!("restrictions: {e}")),
    };
    let args = [OsString::from("30")];
    let (program, args) = match restrict::wrap_outer(&spec.restrictions, Path::new("sleep"), &args)
    {
        Ok(w) => w,
        Err(e) => return fail(format!("restrictions: {e}")),
    };
    let mut cmd = probe_command(&program, &args);
    prepared.apply_to(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("failed to start sleep: {e}")),
    };
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let found = loop {
        let tree = super::witness::descendants(pid);
        let sleeper = std::iter::once(pid)
            .chain(tree.iter().map(|(c, _)| *c))
            .find(|p| {
                fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
            });
        if let Some(sp) = sleeper {
            let parent: BTreeMap<u32, u32> = tree.iter().copied().collect();
            let mut chain = Vec::new();
            let mut disable = spec.restrictions.outer_bwrap.then_some(false);
            let mut p = (sp != pid).then(|| parent.get(&sp).copied()).flatten();
            while let Some(a) = p {
                let comm = fs::read_to_string(format!("/proc/{a}/comm")).unwrap_or_default();
                let argv = fs::read(format!("/proc/{a}/cmdline")).unwrap_or_default();
                let has = |flag: &str| argv.split(|&c| c == 0).any(|x| x == flag.as_bytes());
                let mut label = format!("{}(pid {a}", comm.trim());
                if is_outer_sandbox(a) {
                    label.push_str(", the outer sandbox");
                    if has("--disable-userns") {
                        label.push_str(", --disable-userns");
                        disable = Some(true);
                    }
                }
                label.push(')');
                chain.push(label);
                if a == pid {
                    break;
                }
                p = parent.get(&a).copied();
            }
            break Nesting {
                depth: userns_depth(sp),
                chain,
                outer_disable_userns: disable,
                error: None,
            };
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            break fail(format!(
                "the probe exited ({st}) before it could be read: {}",
                err.lines().next().unwrap_or("").trim()
            ));
        }
        if Instant::now() >= deadline {
            break fail("the probe's sleep did not appear within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
    found
}

/// [`probe_nesting`] once per uid and restrictions (a batch's are fixed), and only for a
/// batch that nests (an outer sandbox or a user-namespace depth); `None` otherwise.
pub fn probe_nesting_cached(spec: &BatchSpec) -> Option<Nesting> {
    use std::sync::Mutex;
    static CACHE: Mutex<BTreeMap<String, Nesting>> = Mutex::new(BTreeMap::new());
    let r = &spec.restrictions;
    if !r.outer_bwrap && r.userns_depth.is_none() {
        return None;
    }
    let key = format!("{}:{r:?}", spec.uid);
    if let Some(n) = CACHE.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Some(n);
    }
    let n = probe_nesting(spec);
    if let Ok(mut c) = CACHE.lock() {
        c.insert(key, n.clone());
    }
    Some(n)
}

/// [`probe_setuid`] once per bwrap file per batch (the batch's uid and restrictions are
/// fixed, so the answer is too).
pub fn probe_setuid_cached(spec: &BatchSpec, bwrap: &Path) -> SetuidSeen {
    use std::sync::Mutex;
    static CACHE: Mutex<BTreeMap<std::path::PathBuf, SetuidSeen>> = Mutex::new(BTreeMap::new());
    if let Some(s) = CACHE.lock().ok().and_then(|c| c.get(bwrap).cloned()) {
        return s;
    }
    let s = probe_setuid(spec, bwrap);
    if let Ok(mut c) = CACHE.lock() {
        c.insert(bwrap.to_path_buf(), s.clone());
    }
    s
}

/// A probe's process: a clean environment, no input or output but stderr, its own process
/// group (so it can be killed with everything it started).
fn probe_command(program: &Path, args: &[OsString]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BatchSpec, PROTOCOL_VERSION};

    fn spec(uid: u32, restrictions: crate::protocol::Restrictions) -> BatchSpec {
        BatchSpec {
            version: PROTOCOL_VERSION,
            batch_id: "probe".into(),
            work_dir: "/nonexistent".into(),
            uid,
            gid: uid,
            restrictions,
            sysctls: Default::default(),
            agent_bin: "/nonexistent".into(),
            kernel_log: None,
            cells: Vec::new(),
        }
    }

    /// A root-owned 4755 copy of the system bwrap: euid 0 seen as uid 1000; not with
    /// no-new-privileges; a plain copy never.
    #[test]
    fn setuid_is_observed_from_proc() {
        let sys = Path::new("/usr/bin/bwrap");
        if unsafe { libc::geteuid() } != 0 || !sys.exists() {
            eprintln!("SKIP setuid_is_observed_from_proc: needs root and /usr/bin/bwrap");
            return;
        }
        let dir = std::env::temp_dir().join(format!("nsmatrix-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let suid = dir.join("bwrap-suid");
        let plain = dir.join("bwrap-plain");
        for (p, mode) in [(&suid, 0o4755), (&plain, 0o755)] {
            fs::copy(sys, p).unwrap();
            std::os::unix::fs::chown(p, Some(0), Some(0)).unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let none = spec(1000, Default::default());
        let seen = probe_setuid(&none, &suid);
        if crate::sandbox::subject::is_nosuid(&suid) {
            assert_eq!(seen.in_effect(), Some(false), "{seen:?}");
        } else {
            assert_eq!(seen.in_effect(), Some(true), "{seen:?}");
            assert!(matches!(
                seen,
                SetuidSeen::Ids {
                    ruid: 1000,
                    euid: 0,
                    ..
                }
            ));
        }
        let plain_seen = probe_setuid(&none, &plain);
        assert_eq!(plain_seen.in_effect(), Some(false), "{plain_seen:?}");
        let nnp = spec(
            1000,
            crate::protocol::Restrictions {
                no_new_privileges: true,
                ..Default::default()
            },
        );
        assert_eq!(probe_setuid(&nnp, &suid).in_effect(), Some(false));
        // The userns-limit-0 profile's user namespace maps root too (the agent is root), so
        // the kernel honours the bit there: euid 0, read from /proc, inside that namespace.
        let userns = spec(
            1000,
            crate::protocol::Restrictions {
                userns_limit: Some(0),
                ..Default::default()
            },
        );
        let seen = probe_setuid(&userns, &suid);
        if crate::sandbox::subject::is_nosuid(&suid) {
            assert_eq!(seen.in_effect(), Some(false), "{seen:?}");
        } else {
            assert!(
                matches!(
                    seen,
                    SetuidSeen::Ids {
                        ruid: 1000,
                        euid: 0,
                        ..
                    }
                ),
                "{seen:?}"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
