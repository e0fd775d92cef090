//! Process-level restrictions, applied by the kernel to the sandbox's process tree: a seccomp
//! filter, a reduced capability bounding set, the drop to the cell's uid, a user namespace
//! with a `max_user_namespaces` limit, and no-new-privileges.
//!
//! Everything is prepared before `fork` ([`Prepared`]); the child only makes system calls, so
//! it is safe to run between fork and exec.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::protocol::Restrictions;

/// Capability names in kernel order (`CAP_CHOWN` = 0 ...).
const CAP_NAMES: &[&str] = &[
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// Docker's default capability set (moby's `DefaultCapabilities`).
pub const DOCKER_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// `CAP_SYS_ADMIN` or `sys_admin` → 21.
pub fn cap_number(name: &str) -> Option<u32> {
    let n = name.trim().to_ascii_lowercase();
    let n = n.strip_prefix("cap_").unwrap_or(&n);
    CAP_NAMES.iter().position(|c| *c == n).map(|i| i as u32)
}

/// The deepest user namespace a process can be in, counted from the initial one: the kernel
/// refuses a new user namespace to a process whose own is already deeper than 32 (measured:
/// 33 nested unshares succeed, the 34th gets ENOSPC).
pub const MAX_USERNS_DEPTH: u32 = 33;

/// A marker in the outer bwrap's environment and command line, so the agent's observers can
/// tell the outer sandbox from the bwrap a cell runs.
pub const OUTER_MARKER: &str = "NSMATRIX_OUTER_SANDBOX";

#[derive(Debug, thiserror::Error)]
pub enum RestrictError {
    #[error("unknown capability {0:?}")]
    UnknownCap(String),
    #[error("seccomp-deny-userns and userns-limit cannot be combined on one process tree")]
    Conflict,
    #[error("userns-depth needs a cell uid other than 0 (each level maps only the cell's own uid)")]
    DepthAsRoot,
    #[error("outer-sandbox = \"bwrap\" needs a bwrap on PATH in the environment")]
    NoOuterBwrap,
    #[error(
        "userns-limit maps root into its user namespace, which needs CAP_SETUID and CAP_SETFCAP (Linux 5.12+) in the agent's effective set; run nsmatrix as root with them"
    )]
    CannotMapRoot,
}

/// Restrictions resolved into plain data the child can apply with system calls only.
pub struct Prepared {
    drop_caps: Vec<u32>,
    seccomp: Option<Vec<libc::sock_filter>>,
    uid: u32,
    gid: u32,
    userns_limit: Option<CString>,
    uid_map: CString,
    gid_map: CString,
    /// The user namespace is entered as root and its maps are written by a helper that stays
    /// in the parent namespace, so root is mapped too and a setuid-root bwrap inside really
    /// runs with euid 0 (an unprivileged agent can map only its own uid).
    map_root: bool,
    nnp: bool,
    /// Levels of user namespaces to nest before exec.
    userns_depth: u32,
    /// A private mount namespace with a fresh procfs (these mount options) and/or read-only
    /// binds (systemd's ProtectProc=/ProcSubset=/ProtectKernelTunables=).
    proc_options: Option<CString>,
    read_only: Vec<CString>,
}

impl Prepared {
    pub fn new(r: &Restrictions, uid: u32, gid: u32) -> Result<Self, RestrictError> {
        if r.seccomp_deny_userns && r.userns_limit.is_some() {
            return Err(RestrictError::Conflict);
        }
        let drop_caps = match &r.bounding_set {
            None => Vec::new(),
            Some(keep) => {
                let keep: Vec<u32> = keep
                    .iter()
                    .map(|c| cap_number(c).ok_or_else(|| RestrictError::UnknownCap(c.clone())))
                    .collect::<Result<_, _>>()?;
                (0..=last_cap()).filter(|c| !keep.contains(c)).collect()
            }
        };
        let cstr = |s: String| CString::new(s).expect("no NUL in a number");
        // Mapping uid 0 needs CAP_SETUID and (since Linux 5.12) CAP_SETFCAP in the parent
        // namespace: only an agent running as root has them.
        let map_root = r.userns_limit.is_some() && unsafe { libc::geteuid() } == 0;
        if map_root && !["setuid", "setfcap"].iter().all(|c| has_effective_cap(c)) {
            return Err(RestrictError::CannotMapRoot);
        }
        let map = |id: u32| {
            if !map_root {
                format!("{id} {id} 1")
            } else if id == 0 {
                "0 0 1".to_string()
            } else {
                format!("0 0 1\n{id} {id} 1")
            }
        };
        if r.userns_depth.is_some() && uid == 0 {
            return Err(RestrictError::DepthAsRoot);
        }
        let mut opts = Vec::new();
        if let Some(h) = &r.protect_proc {
            opts.push(format!("hidepid={h}"));
        }
        if let Some(sub) = r.proc_subset.as_ref().filter(|s| *s != "all") {
            opts.push(format!("subset={sub}"));
        }
        let proc_options = (!opts.is_empty()).then(|| cstr(opts.join(",")));
        let read_only = if r.protect_kernel_tunables {
            PROTECT_KERNEL_TUNABLES
                .iter()
                .map(|p| cstr(p.to_string()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Prepared {
            drop_caps,
            seccomp: r.seccomp_deny_userns.then(deny_userns_filter),
            uid,
            gid,
            userns_limit: r.userns_limit.map(|n| cstr(n.to_string())),
            uid_map: cstr(map(uid)),
            gid_map: cstr(map(gid)),
            map_root,
            nnp: r.no_new_privileges,
            userns_depth: r.userns_depth.unwrap_or(0),
            proc_options,
            read_only,
        })
    }

    /// Install the restrictions on `cmd`, to take effect in the child before exec.
    pub fn apply_to(self, cmd: &mut Command) {
        // SAFETY: the closure only makes system calls on data prepared before fork; it does
        // not allocate or take locks.
        unsafe {
            cmd.pre_exec(move || self.in_child());
        }
    }

    fn in_child(&self) -> io::Result<()> {
        for &cap in &self.drop_caps {
            check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })?;
        }
        // Installed while still root: with CAP_SYS_ADMIN no no-new-privileges is needed, which
        // would otherwise hide the setuid bit and change what is being measured.
        if let Some(prog) = &self.seccomp {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut _,
            };
            check(unsafe {
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const _,
                    0,
                    0,
                )
            })?;
        }
        if self.proc_options.is_some() || !self.read_only.is_empty() {
            self.private_proc()?;
        }
        if let (Some(limit), true) = (&self.userns_limit, self.map_root) {
            self.enter_userns_mapping_root()?;
            // Still root (of the new namespace, with all its capabilities): set its limit
            // before dropping to the cell's uid, which is mapped to itself.
            write_file(c"/proc/sys/user/max_user_namespaces", limit)?;
        }
        if self.uid != 0 || self.gid != 0 {
            let groups = [self.gid];
            check(unsafe { libc::setgroups(1, groups.as_ptr()) })?;
            check(unsafe { libc::setresgid(self.gid, self.gid, self.gid) })?;
            check(unsafe { libc::setresuid(self.uid, self.uid, self.uid) })?;
        }
        if let (Some(limit), false) = (&self.userns_limit, self.map_root) {
            // Changing uid made us non-dumpable, which leaves /proc/self/* owned by root: the
            // maps below could not be written.
            check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) })?;
            check(unsafe { libc::unshare(libc::CLONE_NEWUSER) })?;
            write_file(c"/proc/self/setgroups", c"deny")?;
            write_file(c"/proc/self/uid_map", &self.uid_map)?;
            write_file(c"/proc/self/gid_map", &self.gid_map)?;
            write_file(c"/proc/sys/user/max_user_namespaces", limit)?;
        }
        if self.userns_depth > 0 {
            // As for userns-limit: the drop to the cell's uid made us non-dumpable.
            check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) })?;
            for _ in 0..self.userns_depth {
                check(unsafe { libc::unshare(libc::CLONE_NEWUSER) })?;
                write_file(c"/proc/self/setgroups", c"deny")?;
                write_file(c"/proc/self/uid_map", &self.uid_map)?;
                write_file(c"/proc/self/gid_map", &self.gid_map)?;
            }
        }
        if self.nnp {
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        }
        Ok(())
    }

    /// What systemd does for ProtectProc=/ProcSubset=/ProtectKernelTunables= in a service's
    /// mount namespace, done as root before the drop to the cell's uid: a private mount
    /// namespace (slave to the parent), a fresh procfs on /proc with the options, then the
    /// kernel-tunable paths bind-mounted read-only where they exist.
    fn private_proc(&self) -> io::Result<()> {
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        check(unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            )
        })?;
        let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if let Some(opts) = &self.proc_options {
            check(unsafe {
                libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    hardened,
                    opts.as_ptr().cast(),
                )
            })?;
        }
        for path in &self.read_only {
            let rc = unsafe {
                libc::mount(
                    path.as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            };
            if rc < 0 {
                // A path this procfs does not show (subset=pid hides /proc/sys): nothing to
                // protect, as systemd skips it.
                if io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                    continue;
                }
                return Err(io::Error::last_os_error());
            }
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | hardened,
                    std::ptr::null(),
                )
            })?;
        }
        Ok(())
    }

    /// unshare(CLONE_NEWUSER) as root, with a forked helper left in the parent namespace
    /// writing the new namespace's maps (root and the cell's ids, each to itself): a process
    /// inside the namespace has no capability in the parent and could map only one id.
    fn enter_userns_mapping_root(&self) -> io::Result<()> {
        let mut fds = [0 as libc::c_int; 2];
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        let dir = unsafe {
            libc::open(
                c"/proc/self".as_ptr(),
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if dir < 0 {
            return Err(io::Error::last_os_error());
        }
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // The helper: wait until the namespace exists, write its maps, report by exit code.
            unsafe { libc::close(fds[1]) };
            let mut go = 0u8;
            if unsafe { libc::read(fds[0], (&raw mut go).cast(), 1) } != 1 {
                unsafe { libc::_exit(125) };
            }
            let rc = write_at(dir, c"uid_map", &self.uid_map)
                .and_then(|()| write_at(dir, c"gid_map", &self.gid_map));
            let code = match rc {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(124).clamp(1, 124),
            };
            unsafe { libc::_exit(code) };
        }
        unsafe { libc::close(fds[0]) };
        let entered = check(unsafe { libc::unshare(libc::CLONE_NEWUSER) });
        if entered.is_ok() {
            unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) };
        }
        unsafe {
            libc::close(fds[1]);
            libc::close(dir);
        }
        let mut status = 0;
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        entered?;
        if waited != pid {
            return Err(io::Error::last_os_error());
        }
        match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
            (true, 0) => Ok(()),
            (true, code) if code < 124 => Err(io::Error::from_raw_os_error(code)),
            // No allocation between fork and exec: EPROTO stands for "the helper failed".
            _ => Err(io::Error::from_raw_os_error(libc::EPROTO)),
        }
    }
}

/// The paths systemd's ProtectKernelTunables= makes read-only that bwrap can meet (systemd's
/// list also has /proc/acpi, /proc/fs, /proc/irq ... and hides /proc/kallsyms, /proc/kcore).
const PROTECT_KERNEL_TUNABLES: &[&str] = &["/proc/sys", "/proc/sysrq-trigger", "/sys"];

/// The system's bwrap, for an outer sandbox: the first `bwrap` on the standard PATH.
pub fn system_bwrap() -> Option<std::path::PathBuf> {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join("bwrap"))
    .find(|p| p.is_file())
}

/// The program and arguments to start for `program args` under `r`: with an outer sandbox,
/// the system's bwrap with a user and pid namespace of its own (and `--disable-userns` when
/// asked) around them, the whole file system bound as it is; otherwise unchanged.
pub fn wrap_outer(
    r: &Restrictions,
    program: &std::path::Path,
    args: &[std::ffi::OsString],
) -> Result<(std::path::PathBuf, Vec<std::ffi::OsString>), RestrictError> {
    if !r.outer_bwrap {
        return Ok((program.to_path_buf(), args.to_vec()));
    }
    let bwrap = system_bwrap().ok_or(RestrictError::NoOuterBwrap)?;
    let mut out: Vec<std::ffi::OsString> = [
        "--dev-bind",
        "/",
        "/",
        "--unshare-user",
        "--unshare-pid",
        "--proc",
        "/proc",
        "--die-with-parent",
        "--setenv",
        OUTER_MARKER,
        "1",
    ]
    .iter()
    .map(Into::into)
    .collect();
    if r.outer_disable_userns {
        out.push("--disable-userns".into());
    }
    out.push("--".into());
    out.push(program.as_os_str().to_os_string());
    out.extend(args.iter().cloned());
    Ok((bwrap, out))
}

/// Write `data` to `name` under the directory `dir` (an fd of /proc/<pid>).
fn write_at(dir: libc::c_int, name: &std::ffi::CStr, data: &std::ffi::CStr) -> io::Result<()> {
    unsafe {
        let fd = libc::openat(dir, name.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes = data.to_bytes();
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != bytes.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn write_file(path: &std::ffi::CStr, data: &std::ffi::CStr) -> io::Result<()> {
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes = data.to_bytes();
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != bytes.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

/// Whether capability `name` is in this process's effective set (/proc/self/status `CapEff:`).
fn has_effective_cap(name: &str) -> bool {
    let Some(n) = cap_number(name) else {
        return false;
    };
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|bits| bits & (1u64 << n) != 0)
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_NAMES.len() as u32 - 1)
}

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const NR_CLONE: u32 = 56;
const NR_UNSHARE: u32 = 272;
const NR_CLONE3: u32 = 435;

/// A classic BPF seccomp program: EPERM for clone/unshare whose flags include CLONE_NEWUSER,
/// ENOSYS for clone3 (its flags live in memory a filter cannot read; libc then falls back to
/// clone), everything else allowed. This is what Docker's default profile does to a container
/// without CAP_SYS_ADMIN, restricted to the user-namespace question.
pub fn deny_userns_filter() -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W, ENOSYS, EPERM,
        SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO,
    };
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    const ARCH: u32 = 4;
    const NR: u32 = 0;
    const ARG0_LO: u32 = 16;
    vec![
        /* 0 */ stmt(BPF_LD | BPF_W | BPF_ABS, ARCH),
        /* 1 */
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 6), // other arch: allow
        /* 2 */ stmt(BPF_LD | BPF_W | BPF_ABS, NR),
        /* 3 */ jump(BPF_JMP | BPF_JEQ | BPF_K, NR_CLONE3, 6, 0),
        /* 4 */ jump(BPF_JMP | BPF_JEQ | BPF_K, NR_CLONE, 1, 0),
        /* 5 */ jump(BPF_JMP | BPF_JEQ | BPF_K, NR_UNSHARE, 0, 2),
        /* 6 */ stmt(BPF_LD | BPF_W | BPF_ABS, ARG0_LO),
        /* 7 */ jump(BPF_JMP | BPF_JSET | BPF_K, libc::CLONE_NEWUSER as u32, 1, 0),
        /* 8 */ stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        /* 9 */ stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM as u32),
        /* 10 */ stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS as u32),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_names() {
        assert_eq!(cap_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(cap_number("sys_admin"), Some(21));
        assert_eq!(cap_number("NET_ADMIN"), Some(12));
        assert_eq!(cap_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(cap_number("nope"), None);
        for c in DOCKER_DEFAULT_CAPS {
            assert!(cap_number(c).is_some(), "{c}");
        }
    }

    #[test]
    fn filter_jumps_land_on_returns() {
        let f = deny_userns_filter();
        for (i, ins) in f.iter().enumerate() {
            if ins.code as u32 & 0x07 == libc::BPF_JMP {
                for off in [ins.jt, ins.jf] {
                    let target = i + 1 + off as usize;
                    assert!(target < f.len(), "jump from {i} out of range");
                }
            }
        }
        // instruction 1's false branch (other arch) must be ALLOW, 3's true branch ENOSYS.
        assert_eq!(f[1 + 1 + 6].k, libc::SECCOMP_RET_ALLOW);
        assert_eq!(
            f[3 + 1 + 6].k,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(f[7 + 1 + 1].k, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    }

    #[test]
    fn conflicting_restrictions_are_refused() {
        let r = Restrictions {
            seccomp_deny_userns: true,
            userns_limit: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            Prepared::new(&r, 1000, 1000),
            Err(RestrictError::Conflict)
        ));
        let r = Restrictions {
            bounding_set: Some(vec!["bogus".into()]),
            ..Default::default()
        };
        assert!(matches!(
            Prepared::new(&r, 1000, 1000),
            Err(RestrictError::UnknownCap(_))
        ));
    }

    #[test]
    fn the_outer_sandbox_wraps_the_program_and_is_marked() {
        let args = [std::ffi::OsString::from("--version")];
        let prog = std::path::Path::new("/usr/bin/x");
        let (p, a) = wrap_outer(&Restrictions::default(), prog, &args).unwrap();
        assert_eq!((p.as_path(), a.as_slice()), (prog, &args[..]));
        let Some(bwrap) = system_bwrap() else {
            eprintln!("SKIP the_outer_sandbox_wraps_the_program_and_is_marked: no bwrap on PATH");
            return;
        };
        for disable in [false, true] {
            let r = Restrictions {
                outer_bwrap: true,
                outer_disable_userns: disable,
                ..Default::default()
            };
            let (p, a) = wrap_outer(&r, prog, &args).unwrap();
            assert_eq!(p, bwrap);
            let a: Vec<String> = a.iter().map(|x| x.to_string_lossy().into_owned()).collect();
            let sep = a.iter().position(|x| x == "--").unwrap();
            assert_eq!(a[sep + 1..], ["/usr/bin/x", "--version"]);
            let outer = &a[..sep];
            assert!(outer.iter().any(|x| x == OUTER_MARKER));
            assert!(outer.iter().any(|x| x == "--unshare-user"));
            assert_eq!(outer.iter().any(|x| x == "--disable-userns"), disable);
        }
    }

    /// systemd's ProcSubset=pid and ProtectKernelTunables= and the user-namespace depth,
    /// applied for real in a child: what bwrap then meets.
    #[test]
    fn hardening_and_depth_for_real() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP hardening_and_depth_for_real: needs root (mounts, setresuid)");
            return;
        }
        let run = |r: &Restrictions, uid: u32, script: &str| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script]);
            Prepared::new(r, uid, uid).unwrap().apply_to(&mut cmd);
            let out = cmd.output().expect("sh runs");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let subset = Restrictions {
            proc_subset: Some("pid".into()),
            ..Default::default()
        };
        let (ok, err) = run(&subset, 1000, "cat /proc/sys/kernel/overflowuid");
        assert!(!ok && err.contains("No such file or directory"), "{err}");
        let (ok, _) = run(&subset, 1000, "test -r /proc/self/status");
        assert!(ok, "subset=pid keeps the process directories");
        // Read-only even for root; the value written is the one already there.
        let value = std::fs::read_to_string("/proc/sys/kernel/overflowuid").unwrap();
        let tunables = Restrictions {
            protect_kernel_tunables: true,
            ..Default::default()
        };
        let (ok, err) = run(
            &tunables,
            0,
            &format!("echo {} > /proc/sys/kernel/overflowuid", value.trim()),
        );
        assert!(!ok && err.contains("Read-only file system"), "{err}");
        let (ok, _) = run(&tunables, 1000, "cat /proc/sys/kernel/overflowuid");
        assert!(ok, "ProtectKernelTunables= leaves /proc/sys readable");
        let invisible = Restrictions {
            protect_proc: Some("invisible".into()),
            ..Default::default()
        };
        let (ok, _) = run(&invisible, 1000, "test -e /proc/1");
        assert!(!ok, "hidepid=invisible hides other users' processes");
        // The deepest level still lets unshare(1) create nothing more; one above it does.
        let depth = |d| Restrictions {
            userns_depth: Some(d),
            ..Default::default()
        };
        let (ok, err) = run(&depth(MAX_USERNS_DEPTH), 1000, "unshare -U true");
        assert!(!ok && err.contains("No space left on device"), "{err}");
        let (ok, err) = run(&depth(MAX_USERNS_DEPTH - 1), 1000, "unshare -U true");
        assert!(ok, "{err}");
        assert!(matches!(
            Prepared::new(&depth(2), 0, 0),
            Err(RestrictError::DepthAsRoot)
        ));
    }

    /// The filter, installed for real in a child, denies exactly user namespaces.
    #[test]
    fn filter_denies_userns_for_real() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP filter_denies_userns_for_real: needs root (CAP_SYS_ADMIN)");
            return;
        }
        let r = Restrictions {
            seccomp_deny_userns: true,
            ..Default::default()
        };
        let mut cmd = Command::new("unshare");
        cmd.args(["-U", "true"]);
        Prepared::new(&r, 0, 0).unwrap().apply_to(&mut cmd);
        let out = cmd.output().expect("unshare runs");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"));
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "true"]);
        Prepared::new(&r, 0, 0).unwrap().apply_to(&mut cmd);
        assert!(
            cmd.status().unwrap().success(),
            "a mount namespace stays allowed"
        );
    }
}
