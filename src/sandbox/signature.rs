//! The one table of failure signatures: what bwrap, Codex or the kernel said → a named
//! mechanism and a one-line remedy. Nothing else in nsmatrix knows these strings.

/// How a line of output is recognised.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// The text contains this (case-sensitive).
    Contains(&'static str),
    /// The text contains both, in this order.
    Both(&'static str, &'static str),
}

impl Pattern {
    fn matches(self, text: &str) -> bool {
        match self {
            Pattern::Contains(s) => text.contains(s),
            Pattern::Both(a, b) => text
                .find(a)
                .is_some_and(|i| text[i + a.len()..].contains(b)),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Signature {
    /// Stable kebab-case name, used in matrix `expect` rules and reports.
    pub name: &'static str,
    /// The mechanism behind it (documentation of the row; no report shows it yet).
    #[allow(dead_code)]
    pub mechanism: &'static str,
    /// What makes it go away.
    pub remedy: &'static str,
    patterns: &'static [Pattern],
}

use Pattern::{Both, Contains};

use crate::sandbox::restrict::MAX_USERNS_DEPTH;

/// Ordered: the first row whose pattern matches wins, so more specific rows come first.
static TABLE: &[Signature] = &[
    Signature {
        name: "proc-sys-unreadable",
        mechanism: "bwrap cannot read /proc/sys/kernel/overflowuid, which it reads first: /proc is a procfs mounted with subset=pid, which has no /proc/sys (systemd's ProcSubset=pid; measured: ProtectKernelTunables= and ProtectProc=invisible do not cause it)",
        remedy: "drop ProcSubset=pid from the service's unit (ProcSubset=all), or run the tool outside that unit",
        patterns: &[Contains("Can't read /proc/sys/kernel/overflow")],
    },
    Signature {
        name: "bwrap-too-old",
        mechanism: "this bwrap predates an option Codex passes (--argv0 needs bubblewrap 0.9; Ubuntu 20.04 ships 0.4.0)",
        remedy: "install bubblewrap 0.9 or newer, or let Codex use its bundled bwrap (remove the old one from PATH)",
        patterns: &[Contains("Unknown option --argv0")],
    },
    Signature {
        name: "landlock-unsupported",
        mechanism: "Codex's Landlock+seccomp sandbox (0.114 and before) cannot restrict the command: the kernel has no Landlock (before 5.13, or built without CONFIG_SECURITY_LANDLOCK), and Codex panics",
        remedy: "use a kernel with Landlock (5.13+ with CONFIG_SECURITY_LANDLOCK=y), or a Codex release that sandboxes with bwrap (0.115 and later)",
        patterns: &[Contains("Sandbox(LandlockRestrict)")],
    },
    Signature {
        name: "userns-lsm-denied",
        mechanism: "clone(CLONE_NEWUSER) gives EACCES: a security module denies the user namespace (an AppArmor profile confining bwrap without a `userns,` rule, an SELinux policy); the cell's kernel log shows AppArmor's `apparmor=\"DENIED\" operation=\"userns_create\"`",
        remedy: "give the bwrap that runs a profile with `userns,` (Ubuntu's bwrap-userns-restrict covers /usr/bin/bwrap only, not a copy or Codex's bundled bwrap), set kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu), or run the container with apparmor=unconfined",
        patterns: &[Both("Creating new namespace failed", "Permission denied")],
    },
    Signature {
        name: "bwrap-missing",
        mechanism: "no bwrap was found to run (Codex: none on PATH and no bundled codex-resources/bwrap)",
        remedy: "install bubblewrap in the environment (apt-get install bubblewrap), or keep Codex's bundled bwrap next to its binary",
        patterns: &[
            Contains("bubblewrap is unavailable"),
            Contains("no system bwrap was found"),
        ],
    },
    Signature {
        name: "codex-missing",
        mechanism: "the environment has no Codex CLI of its own (no `codex` on PATH nor in npm's global node_modules)",
        remedy: "install Codex in the image (npm install -g @openai/codex) if it should ship one; otherwise this subject is absent, not broken",
        patterns: &[],
    },
    Signature {
        name: "setuid-refused",
        mechanism: "this bwrap build refuses to run setuid (upstream removed setuid mode in 0.11.2+)",
        remedy: "do not chmod u+s this bwrap; allow unprivileged user namespaces instead, or use a bwrap built with -Dsupport_setuid",
        patterns: &[Contains("setuid use of bubblewrap is not supported")],
    },
    Signature {
        name: "userns-unsupported",
        mechanism: "clone(CLONE_NEWUSER) gives EINVAL: the kernel is built without CONFIG_USER_NS",
        remedy: "use a kernel with CONFIG_USER_NS=y, or a setuid bwrap with an argv that does not pass --unshare-user",
        patterns: &[
            Contains("kernel does not support user namespaces"),
            Both("Creating new namespace failed", "Invalid argument"),
            Both("unshare", "Invalid argument"),
        ],
    },
    Signature {
        name: "userns-limit",
        mechanism: "clone/unshare(CLONE_NEWUSER) gives ENOSPC and the observed facts do not say why: user.max_user_namespaces is 0 (or exhausted), the nesting limit, or an outer --disable-userns (the family of userns-nesting-limit and userns-disabled-outer)",
        remedy: "raise user.max_user_namespaces on the kernel that runs the sandbox (a setuid bwrap does not help)",
        patterns: &[
            Contains("max_*_namespaces exceeded"),
            Contains("max_user_namespaces"),
            Both("Creating new namespace failed", "No space left on device"),
            Both("namespace", "No space left on device"),
            Both("unshare user ns", "No space left on device"),
        ],
    },
    Signature {
        name: "userns-denied",
        mechanism: "creating a namespace gives EPERM and the observed facts do not say which of seccomp, kernel.unprivileged_userns_clone=0 or a missing CAP_SYS_ADMIN denied it (the family of the userns-denied-* signatures)",
        remedy: "run the container with seccomp=unconfined (plus the capabilities bwrap needs), set kernel.unprivileged_userns_clone=1, or make bwrap setuid where seccomp allows it",
        patterns: &[
            Contains("No permissions to creat"),
            Both("Creating new namespace failed", "Operation not permitted"),
            Both("unshare", "Operation not permitted"),
            Both("clone", "Operation not permitted"),
        ],
    },
    Signature {
        name: "capset-denied",
        mechanism: "setuid bwrap cannot keep the capabilities it needs: the bounding set lacks one of SYS_ADMIN, NET_ADMIN, SYS_PTRACE, SETUID, SETGID, SYS_CHROOT",
        remedy: "add the missing capabilities to the container (e.g. cap_add NET_ADMIN next to SYS_ADMIN), or use an unprivileged bwrap where user namespaces are allowed",
        patterns: &[
            Contains("capset failed"),
            Contains("Unexpected capabilities"),
        ],
    },
    Signature {
        name: "proc-mount-denied",
        mechanism: "mounting a new /proc is refused: the /proc it would reveal has paths mounted over it (a container's masked /proc paths; systemd's ProtectKernelTunables=, which binds /proc/sys read-only), or there is no CAP_SYS_ADMIN over the pid namespace",
        remedy: "run the container with systempaths=unconfined (or privileged) or the service without ProtectKernelTunables=, or drop --proc from the argv (Codex retries with --no-proc)",
        patterns: &[Contains("Can't mount proc")],
    },
    Signature {
        name: "uid-map-denied",
        mechanism: "the user namespace was created but writing its uid map was denied, and the cell's kernel log does not say by what (the family of uid-map-denied-apparmor)",
        remedy: "allow the program in AppArmor (an unconfined profile for bwrap) or set kernel.apparmor_restrict_unprivileged_userns=0",
        patterns: &[
            Contains("setting up uid map"),
            Contains("setting up gid map"),
        ],
    },
    Signature {
        name: "net-setup-denied",
        mechanism: "bwrap could not bring up loopback in its new network namespace, with an errno and facts that do not say why (the family of net-admin-missing and loopback-preconfigured)",
        remedy: "read the errno: EPERM is a missing CAP_NET_ADMIN or a security module, EEXIST a network stack that configures loopback itself; or run without --unshare-net",
        patterns: &[
            Contains("Failed RTM_NEWADDR"),
            Contains("Failed RTM_NEWLINK"),
            Contains("loopback: Failed"),
        ],
    },
    Signature {
        name: "lsm-mount-denied",
        mechanism: "a mount inside the sandbox gives EACCES: a security module (AppArmor, e.g. Docker's docker-default profile with seccomp unconfined; SELinux) denies it, not file permissions",
        remedy: "run the container with apparmor=unconfined (or a profile with `mount,` for bwrap), load bwrap-userns-restrict for /usr/bin/bwrap (not a bundled bwrap), or set kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu)",
        patterns: &[
            Both("Failed to make / slave", "Permission denied"),
            Both("Failed to mount tmpfs", "Permission denied"),
            Both("Can't mount", "Permission denied"),
            Both("Can't bind mount", "Permission denied"),
        ],
    },
    Signature {
        name: "mkdir-parents-denied",
        mechanism: "bwrap cannot create the parents of a bind target: file permissions on the path (an ancestor of the workspace the sandbox's uid cannot search or write), not a security module",
        remedy: "make every ancestor of the workspace searchable (o+x) by the uid that runs the sandbox, or put the workspace under a directory it owns",
        patterns: &[Contains("Can't mkdir parents")],
    },
    Signature {
        name: "mount-denied",
        mechanism: "a bind or tmpfs mount inside the sandbox was refused",
        remedy: "check the container's mount propagation and security profile (AppArmor/SELinux)",
        patterns: &[
            Both("Can't", "mount"),
            Contains("Can't create file at"),
            Contains("Failed to make / slave"),
            Contains("Failed to mount tmpfs"),
        ],
    },
    Signature {
        name: "bwrap-option-unsupported",
        mechanism: "this bwrap build does not know an option of the argv profile",
        remedy: "use a newer bwrap, or an argv profile for this version",
        patterns: &[Contains("Unknown option")],
    },
];

/// Members of a family: chosen by [`refine`] from a family row's message and the observed
/// [`Facts`], each with its own remedy. An expectation naming the family matches every member.
static MEMBERS: &[Signature] = &[
    Signature {
        name: "userns-denied-seccomp",
        mechanism: "clone(CLONE_NEWUSER)/unshare gives EPERM from a seccomp filter on the sandbox's process tree (Docker's default profile without CAP_SYS_ADMIN; Seccomp: 2 observed)",
        remedy: "run the container with seccomp=unconfined or a profile that allows clone/unshare with namespace flags (plus the capabilities bwrap needs)",
        patterns: &[],
    },
    Signature {
        name: "userns-denied-sysctl",
        mechanism: "an unprivileged clone(CLONE_NEWUSER) gives EPERM because kernel.unprivileged_userns_clone is 0 (observed), with no seccomp filter in play",
        remedy: "set kernel.unprivileged_userns_clone=1 on the kernel that runs the sandbox, or make bwrap setuid",
        patterns: &[],
    },
    Signature {
        name: "userns-denied-caps",
        mechanism: "a privileged bwrap (root, or setuid in effect) creating its namespaces without a user namespace gets EPERM: CAP_SYS_ADMIN is not in its effective set (observed), no seccomp filter in play",
        remedy: "add SYS_ADMIN to the container (cap_add) or its bounding set, or run bwrap unprivileged with --unshare-user where user namespaces are allowed",
        patterns: &[],
    },
    Signature {
        name: "userns-denied-apparmor",
        mechanism: "the user namespace is created but creating the other namespaces in it gives EPERM: AppArmor denied CAP_SYS_ADMIN there (a profile that lets bwrap create user namespaces but holds no capability, as Ubuntu's `unprivileged_userns` does); the cell's kernel log has the `apparmor=\"DENIED\" operation=\"capable\"` line",
        remedy: "load Ubuntu's bwrap-userns-restrict (it covers /usr/bin/bwrap only: Codex's bundled bwrap stays restricted), set kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu), or run the container with apparmor=unconfined",
        patterns: &[],
    },
    Signature {
        name: "net-admin-missing",
        mechanism: "bwrap could not configure loopback in its new network namespace: EPERM (no CAP_NET_ADMIN there, or an AppArmor userns restriction), or any errno while the sandbox observably lacks CAP_NET_ADMIN (root in a container without NET_ADMIN gives ECHILD)",
        remedy: "add NET_ADMIN to the container (cap_add), or let bwrap run unprivileged with a user namespace of its own",
        patterns: &[],
    },
    Signature {
        name: "userns-nesting-limit",
        mechanism: "the sandbox starts 32 or more user namespaces deep (observed in /proc), where the kernel's nesting limit leaves no room for the one or two user namespaces bwrap creates (beyond depth 33 clone(CLONE_NEWUSER) gives ENOSPC)",
        remedy: "nest fewer sandboxes: let the outer layers share a user namespace instead of one each, or run the tool without its own sandbox where an outer one already confines it (Codex: --sandbox danger-full-access inside the external sandbox)",
        patterns: &[],
    },
    Signature {
        name: "userns-disabled-outer",
        mechanism: "the sandbox runs inside an outer bwrap started with --disable-userns (observed in /proc): bwrap 0.8+ puts it in a user namespace whose parent allows no further one, so creating a user namespace gives ENOSPC",
        remedy: "start the outer sandbox without --disable-userns, or run the tool without its own sandbox inside it (Codex: --sandbox danger-full-access), the outer one confining it instead",
        patterns: &[],
    },
    Signature {
        name: "uid-map-denied-apparmor",
        mechanism: "the user namespace was created but its uid map could not be written: AppArmor denied the capability there (Ubuntu's kernel.apparmor_restrict_unprivileged_userns=1 moves the bwrap into `unprivileged_userns`, or a profile denies bwrap capabilities); the cell's kernel log has the `apparmor=\"DENIED\"` line",
        remedy: "load Ubuntu's bwrap-userns-restrict (it covers /usr/bin/bwrap only: Codex's bundled bwrap stays restricted), set kernel.apparmor_restrict_unprivileged_userns=0, or run the container with apparmor=unconfined",
        patterns: &[],
    },
    Signature {
        name: "loopback-denied-apparmor",
        mechanism: "bwrap could not bring up loopback in its new network namespace (--unshare-net): AppArmor denied CAP_NET_ADMIN there (Ubuntu's kernel.apparmor_restrict_unprivileged_userns=1, or a profile denying bwrap capabilities); the cell's kernel log has the `apparmor=\"DENIED\"` line",
        remedy: "load Ubuntu's bwrap-userns-restrict (it covers /usr/bin/bwrap only: Codex's bundled bwrap stays restricted), set kernel.apparmor_restrict_unprivileged_userns=0, or run the container with apparmor=unconfined",
        patterns: &[],
    },
    Signature {
        name: "loopback-preconfigured",
        mechanism: "RTM_NEWADDR gives EEXIST: the runtime's network stack creates network namespaces with loopback already configured (gVisor), which bwrap then fails to add again",
        remedy: "use a runtime whose new network namespaces start with lo down and unaddressed (a gVisor with that fix), or run without --unshare-net",
        patterns: &[],
    },
];

/// (member, family): an expectation naming the family is met by any member.
const FAMILIES: &[(&str, &str)] = &[
    ("userns-denied-seccomp", "userns-denied"),
    ("userns-denied-sysctl", "userns-denied"),
    ("userns-denied-caps", "userns-denied"),
    ("userns-denied-apparmor", "userns-denied"),
    ("net-admin-missing", "net-setup-denied"),
    ("loopback-preconfigured", "net-setup-denied"),
    ("mkdir-parents-denied", "mount-denied"),
    ("userns-nesting-limit", "userns-limit"),
    ("userns-disabled-outer", "userns-limit"),
    ("uid-map-denied-apparmor", "uid-map-denied"),
    ("loopback-denied-apparmor", "net-setup-denied"),
];

/// The family a signature belongs to, if it is a member of one.
pub fn family_of(name: &str) -> Option<&'static str> {
    FAMILIES.iter().find(|(m, _)| *m == name).map(|(_, f)| *f)
}

/// Whether an observed signature meets an expected one: the same name, or a member of the
/// expected family (`userns-denied` is met by `userns-denied-seccomp`, never the reverse).
pub fn satisfies(expected: &str, observed: &str) -> bool {
    expected == observed || family_of(observed) == Some(expected)
}

/// What the agent observed about the process tree that ran the sandbox, to tell members of a
/// family apart. `None` means not observed; a member is then never guessed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// A seccomp filter applies to the sandbox (Seccomp: 2 or Seccomp_filters > 0 in
    /// /proc/self/status of the agent, or one the agent installs for the cell).
    pub seccomp_filter: Option<bool>,
    /// kernel.unprivileged_userns_clone (a Debian patch; absent elsewhere).
    pub unprivileged_userns_clone: Option<bool>,
    /// CAP_SYS_ADMIN in the effective set a privileged bwrap runs with.
    pub sys_admin: Option<bool>,
    /// CAP_NET_ADMIN in the effective set a privileged bwrap runs with.
    pub net_admin: Option<bool>,
    /// How many user namespaces below the agent's the sandbox's program starts (observed in
    /// /proc; only for a batch that nests).
    pub userns_depth: Option<u32>,
    /// An outer bwrap with `--disable-userns` observed above the sandbox's program.
    pub outer_disable_userns: Option<bool>,
    /// The cell's kernel log has an `apparmor="DENIED"` line (a QEMU guest follows its log;
    /// elsewhere not observed).
    pub apparmor_denied: Option<bool>,
}

impl Facts {
    /// One line for a record's details: the facts a member was chosen from.
    pub fn describe(&self) -> String {
        let f = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not observed",
        };
        let mut s = format!(
            "seccomp filter: {}; kernel.unprivileged_userns_clone=1: {}; CAP_SYS_ADMIN: {}; CAP_NET_ADMIN: {}",
            f(self.seccomp_filter),
            f(self.unprivileged_userns_clone),
            f(self.sys_admin),
            f(self.net_admin)
        );
        if let Some(d) = self.userns_depth {
            s.push_str(&format!("; user-namespace depth: {d}"));
        }
        if self.outer_disable_userns.is_some() {
            s.push_str(&format!(
                "; outer bwrap --disable-userns: {}",
                f(self.outer_disable_userns)
            ));
        }
        if self.apparmor_denied.is_some() {
            s.push_str(&format!(
                "; AppArmor denial in the kernel log: {}",
                f(self.apparmor_denied)
            ));
        }
        s
    }
}

/// The member of `sig`'s family that `message` (bwrap's line) and `facts` single out, or
/// `sig` itself when they do not.
pub fn refine(sig: &'static Signature, message: &str, facts: &Facts) -> &'static Signature {
    let member = |n: &str| MEMBERS.iter().find(|s| s.name == n).unwrap_or(sig);
    match sig.name {
        "userns-denied" => {
            // bwrap says "No permissions to create..." only on its unprivileged path (EPERM
            // for clone(CLONE_NEWUSER) as a plain uid); privileged it says "Creating new
            // namespace failed: Operation not permitted".
            let unprivileged = message.contains("No permissions to creat");
            if facts.apparmor_denied == Some(true) {
                member("userns-denied-apparmor")
            } else if facts.seccomp_filter == Some(true) {
                member("userns-denied-seccomp")
            } else if facts.seccomp_filter == Some(false)
                && unprivileged
                && facts.unprivileged_userns_clone == Some(false)
            {
                member("userns-denied-sysctl")
            } else if facts.seccomp_filter == Some(false)
                && !unprivileged
                && facts.sys_admin == Some(false)
            {
                member("userns-denied-caps")
            } else {
                sig
            }
        }
        // ENOSPC: the nesting limit when the sandbox starts so deep that bwrap's one or two
        // user namespaces do not fit below the deepest level; an observed outer
        // --disable-userns otherwise.
        "userns-limit" => {
            if facts
                .userns_depth
                .is_some_and(|d| d + 1 >= MAX_USERNS_DEPTH)
            {
                member("userns-nesting-limit")
            } else if facts.outer_disable_userns == Some(true) {
                member("userns-disabled-outer")
            } else {
                sig
            }
        }
        "uid-map-denied" if facts.apparmor_denied == Some(true) => {
            member("uid-map-denied-apparmor")
        }
        "net-setup-denied" if facts.apparmor_denied == Some(true) => {
            member("loopback-denied-apparmor")
        }
        "net-setup-denied" => match errno_of(message) {
            Some("EEXIST") => member("loopback-preconfigured"),
            Some("EPERM" | "EACCES") => member("net-admin-missing"),
            _ if facts.net_admin == Some(false) => member("net-admin-missing"),
            _ => sig,
        },
        _ => sig,
    }
}

/// Signatures that are decided by the agent from what it observed, not from text.
static INFERRED: &[Signature] = &[
    Signature {
        name: "setuid-ignored-nnp",
        mechanism: "the setuid bit was ignored because no-new-privileges is set, so bwrap ran unprivileged",
        remedy: "drop no-new-privileges (k8s allowPrivilegeEscalation: true) or allow unprivileged user namespaces",
        patterns: &[],
    },
    Signature {
        name: "sandbox-not-observed",
        mechanism: "the patch was applied but no sandbox was seen doing it (Codex: no bwrap process in its process tree)",
        remedy: "check that Codex runs its sandbox here (sandbox_mode, a bwrap it can start); a run without a sandbox is not a pass",
        patterns: &[],
    },
    Signature {
        name: "apply-patch-error",
        mechanism: "the sandbox started but apply_patch exited with another code than the scenario expects",
        remedy: "read apply_patch's stderr: the patch or the scenario is wrong, or the sandbox hides a file",
        patterns: &[],
    },
    Signature {
        name: "output-mismatch",
        mechanism: "apply_patch's stdout or stderr differs from the scenario's expectation",
        remedy: "compare the output with scenario.toml's stdout/stderr",
        patterns: &[],
    },
    Signature {
        name: "tree-mismatch",
        mechanism: "the files after the patch differ from the scenario's expected/ tree",
        remedy: "see the first differing file in the message",
        patterns: &[],
    },
    Signature {
        name: "sandbox-escape",
        mechanism: "a write outside the workspace succeeded inside the sandbox",
        remedy: "the sandbox does not confine writes: check the bwrap argv (--ro-bind / /) and the workspace binds",
        patterns: &[],
    },
    Signature {
        name: "timeout",
        mechanism: "the sandboxed command did not finish within the cell's timeout and was killed",
        remedy: "raise cell-timeout, or look for a hang in the sandbox's start-up",
        patterns: &[],
    },
    Signature {
        name: "sysctl-missing",
        mechanism: "the kernel does not have a sysctl this environment sets",
        remedy: "use a kernel that has it, or another sysctl set",
        patterns: &[],
    },
    Signature {
        name: "unknown",
        mechanism: "the failure matched no known signature; the raw output is kept",
        remedy: "read the stderr tail; add a row to the signature table if it is a new mechanism",
        patterns: &[],
    },
];

/// The first line the sandbox front end itself printed (`bwrap: ...`), whether or not a
/// signature matches it: apply_patch never prints such a line, so its presence means the
/// sandbox failed, even where the exit code happens to be the one a scenario expects.
pub fn front_end_line(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("bwrap:"))
}

/// Classify sandbox output. Only lines that look like they come from the sandbox front end
/// (bwrap, codex, the kernel) are considered, so apply_patch's own messages about a patch never
/// masquerade as a namespace failure.
pub fn classify(stderr: &str) -> Option<&'static Signature> {
    let relevant: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("bwrap:")
                || l.contains("codex")
                || l.contains("sandbox")
                || l.starts_with("unshare")
                || l.starts_with("Error")
        })
        .collect();
    for line in relevant {
        if let Some(sig) = TABLE
            .iter()
            .find(|s| s.patterns.iter().any(|p| p.matches(line)))
        {
            return Some(sig);
        }
    }
    None
}

/// The errno a bwrap/kernel message ends with (`...: Operation not permitted` → `EPERM`), so
/// that the same line with another errno is told apart (`RTM_NEWADDR: Operation not
/// permitted` is a permissions problem, `RTM_NEWADDR: No child processes` is not).
pub fn errno_of(message: &str) -> Option<&'static str> {
    const ERRNOS: &[(&str, &str)] = &[
        ("Operation not permitted", "EPERM"),
        ("Permission denied", "EACCES"),
        ("No space left on device", "ENOSPC"),
        ("Invalid argument", "EINVAL"),
        ("No such file or directory", "ENOENT"),
        ("Read-only file system", "EROFS"),
        ("No child processes", "ECHILD"),
        ("Function not implemented", "ENOSYS"),
        ("Operation not supported", "EOPNOTSUPP"),
        ("Device or resource busy", "EBUSY"),
        ("Bad file descriptor", "EBADF"),
        ("File exists", "EEXIST"),
    ];
    let line = message.lines().next().unwrap_or("");
    ERRNOS
        .iter()
        .filter_map(|(text, name)| line.rfind(text).map(|i| (i, *name)))
        .max_by_key(|(i, _)| *i)
        .map(|(_, name)| name)
}

/// Look a signature up by name (matched and inferred alike).
pub fn by_name(name: &str) -> Option<&'static Signature> {
    TABLE
        .iter()
        .chain(MEMBERS)
        .chain(INFERRED)
        .find(|s| s.name == name)
}

/// Every signature name, for validating `expect` rules.
pub fn names() -> impl Iterator<Item = &'static str> {
    TABLE.iter().chain(MEMBERS).chain(INFERRED).map(|s| s.name)
}

/// Signatures that say the harness, the scenario or the patch is wrong, never how a sandbox
/// behaves: an `expect` rule may not name them.
const NEVER_EXPECTED: &[&str] = &[
    "unknown",
    "tree-mismatch",
    "output-mismatch",
    "apply-patch-error",
];

/// Whether a matrix may expect `name` on cells of `backend` (`host`, `docker`, `qemu`): only
/// signatures the classifier can produce there. `Err` says why not.
pub fn expectable_on(name: &str, backend: &str) -> Result<(), String> {
    if by_name(name).is_none() {
        return Err("no signature has this name".into());
    }
    if NEVER_EXPECTED.contains(&name) {
        return Err(
            "it means the harness, the scenario or the patch is wrong, not how the sandbox behaves"
                .into(),
        );
    }
    let only: Option<&[&str]> = match name {
        // Only a guest's agent sets sysctls, so only a guest can miss one.
        "sysctl-missing" => Some(&["qemu"]),
        // Needs a no-new-privileges profile, which host and docker environments have.
        "setuid-ignored-nnp" => Some(&["host", "docker"]),
        _ => None,
    };
    match only {
        Some(list) if !list.contains(&backend) => Err(format!(
            "the classifier gives it only on {} cells",
            list.join(", ")
        )),
        _ => Ok(()),
    }
}

/// The signatures `expectable_on` accepts for `backend`.
pub fn expectable_names(backend: &str) -> Vec<&'static str> {
    names()
        .filter(|n| expectable_on(n, backend).is_ok())
        .collect()
}

/// The remedy line for a signature name (empty for an unknown name).
pub fn remedy(name: &str) -> &'static str {
    by_name(name).map(|s| s.remedy).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(stderr: &str) -> Option<&'static str> {
        classify(stderr).map(|s| s.name)
    }

    #[test]
    fn bwrap_messages_by_build_and_mechanism() {
        let cases = [
            (
                "bwrap: Creating new namespace failed: Operation not permitted",
                "userns-denied",
            ),
            (
                "bwrap: No permissions to creating new namespace, likely because the kernel does not allow non-privileged user namespaces. On e.g. debian this can be enabled with 'sysctl kernel.unprivileged_userns_clone=1'.",
                "userns-denied",
            ),
            (
                "bwrap: No permissions to create a new namespace, likely because the kernel does not allow non-privileged user namespaces.",
                "userns-denied",
            ),
            (
                "bwrap: Creating new namespace failed, likely because the kernel does not support user namespaces.  bwrap must be installed setuid on such systems.",
                "userns-unsupported",
            ),
            (
                "bwrap: Creating new namespace failed: Invalid argument",
                "userns-unsupported",
            ),
            (
                "bwrap: Creating new namespace failed: nesting depth or /proc/sys/user/max_*_namespaces exceeded (ENOSPC)",
                "userns-limit",
            ),
            (
                "bwrap: Creating new namespace failed: No space left on device",
                "userns-limit",
            ),
            // bwrap 0.8.0 with --unshare-user, 32 user namespaces deep: its clone() gets the
            // 33rd, its second unshare the refused 34th (measured).
            (
                "bwrap: unshare user ns: No space left on device",
                "userns-limit",
            ),
            (
                "bwrap: capset failed: Operation not permitted",
                "capset-denied",
            ),
            (
                "bwrap: Can't mount proc on /newroot/proc: Operation not permitted",
                "proc-mount-denied",
            ),
            (
                "bwrap: setting up uid map: Permission denied",
                "uid-map-denied",
            ),
            (
                "bwrap: loopback: Failed RTM_NEWADDR: No child processes",
                "net-setup-denied",
            ),
            (
                "bwrap: setuid use of bubblewrap is not supported",
                "setuid-refused",
            ),
            ("bwrap: Unknown option --argv0", "bwrap-too-old"),
            (
                "error applying legacy Linux sandbox restrictions: Sandbox(LandlockRestrict)",
                "landlock-unsupported",
            ),
            (
                "bwrap: Unknown option --disable-userns",
                "bwrap-option-unsupported",
            ),
            (
                "bwrap: Can't read /proc/sys/kernel/overflowuid: No such file or directory",
                "proc-sys-unreadable",
            ),
            (
                "bwrap: Creating new namespace failed: Permission denied",
                "userns-lsm-denied",
            ),
            (
                "bwrap: Failed to make / slave: Permission denied",
                "lsm-mount-denied",
            ),
            (
                "bwrap: Can't mount tmpfs on /newroot/tmp: Permission denied",
                "lsm-mount-denied",
            ),
            // File permissions, not a security module: the remedy differs.
            (
                "bwrap: Can't mkdir parents for /var/tmp/nsmatrix/x/ws: Permission denied",
                "mkdir-parents-denied",
            ),
            (
                "bwrap: Can't create file at /dev/null: Permission denied",
                "mount-denied",
            ),
            (
                "bwrap: Can't create file at /newroot/dev/null: Read-only file system",
                "mount-denied",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(name(text), Some(want), "{text}");
        }
    }

    #[test]
    fn errno_is_kept_beside_the_text() {
        assert_eq!(
            errno_of("bwrap: loopback: Failed RTM_NEWADDR: Operation not permitted"),
            Some("EPERM")
        );
        assert_eq!(
            errno_of("bwrap: loopback: Failed RTM_NEWADDR: No child processes"),
            Some("ECHILD")
        );
        assert_eq!(
            errno_of("bwrap: Creating new namespace failed: Permission denied"),
            Some("EACCES")
        );
        assert_eq!(errno_of("bwrap: Unknown option --argv0"), None);
    }

    #[test]
    fn apply_patch_messages_are_not_sandbox_failures() {
        assert_eq!(
            name("Invalid patch: The first line of the patch must be '*** Begin Patch'"),
            None
        );
        assert_eq!(
            name("Failed to find expected lines in a.txt:\nOperation not permitted"),
            None
        );
        assert_eq!(name(""), None);
    }

    #[test]
    fn every_name_is_unique_and_has_a_remedy() {
        let all: Vec<_> = names().collect();
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(all.len(), dedup.len());
        for n in all {
            assert!(!remedy(n).is_empty(), "{n}");
        }
    }

    /// Each member, from the real line bwrap printed and the facts observed with it.
    #[test]
    fn family_members_from_message_and_facts() {
        const UNPRIV: &str = "bwrap: No permissions to create new namespace, likely because the kernel does not allow non-privileged user namespaces. On e.g. debian this can be enabled with 'sysctl kernel.unprivileged_userns_clone=1'.";
        const PRIV: &str = "bwrap: Creating new namespace failed: Operation not permitted";
        let facts = |seccomp, clone, sys_admin, net_admin| Facts {
            seccomp_filter: seccomp,
            unprivileged_userns_clone: clone,
            sys_admin,
            net_admin,
            ..Default::default()
        };
        let cases = [
            // Docker's default profile, uid 1000 / root: the filter denies it.
            (
                UNPRIV,
                facts(Some(true), Some(true), Some(false), Some(false)),
                "userns-denied-seccomp",
            ),
            (
                PRIV,
                facts(Some(true), Some(true), Some(false), Some(false)),
                "userns-denied-seccomp",
            ),
            // A Debian kernel with kernel.unprivileged_userns_clone=0, no filter.
            (
                UNPRIV,
                facts(Some(false), Some(false), Some(false), Some(false)),
                "userns-denied-sysctl",
            ),
            // Root without CAP_SYS_ADMIN (seccomp=unconfined, Docker's default caps).
            (
                PRIV,
                facts(Some(false), Some(true), Some(false), Some(false)),
                "userns-denied-caps",
            ),
            // Facts that do not decide: the family row, never a guess.
            (
                UNPRIV,
                facts(Some(false), Some(true), Some(false), Some(false)),
                "userns-denied",
            ),
            (PRIV, facts(None, None, None, None), "userns-denied"),
            (
                PRIV,
                facts(Some(false), None, Some(true), Some(true)),
                "userns-denied",
            ),
            // Loopback: EPERM and EEXIST by errno; ECHILD (root under the holyclaude compose)
            // by the observed missing NET_ADMIN.
            (
                "bwrap: loopback: Failed RTM_NEWADDR: Operation not permitted",
                facts(None, None, None, None),
                "net-admin-missing",
            ),
            (
                "bwrap: loopback: Failed RTM_NEWADDR: File exists",
                facts(None, None, None, Some(true)),
                "loopback-preconfigured",
            ),
            (
                "bwrap: loopback: Failed RTM_NEWADDR: No child processes",
                facts(Some(false), None, Some(true), Some(false)),
                "net-admin-missing",
            ),
            (
                "bwrap: loopback: Failed RTM_NEWADDR: No child processes",
                facts(None, None, None, Some(true)),
                "net-setup-denied",
            ),
            (
                "bwrap: loopback: Failed RTM_NEWADDR: No child processes",
                facts(None, None, None, None),
                "net-setup-denied",
            ),
        ];
        for (text, f, want) in cases {
            let sig = classify(text).expect(text);
            let got = refine(sig, text, &f).name;
            assert_eq!(got, want, "{text} with {f:?}");
            assert!(
                satisfies(sig.name, got),
                "{got} is in {}'s family",
                sig.name
            );
            assert!(satisfies(got, got));
            assert!(!remedy(got).is_empty());
        }
        // ENOSPC, each message as measured: 32 and 33 user namespaces deep (the nesting
        // limit), inside an outer bwrap with --disable-userns, and with neither observed.
        const ENOSPC: &str = "bwrap: Creating new namespace failed: nesting depth or /proc/sys/user/max_*_namespaces exceeded (ENOSPC)";
        const UNSHARE: &str = "bwrap: unshare user ns: No space left on device";
        let nest = |depth, disable| Facts {
            seccomp_filter: Some(false),
            userns_depth: depth,
            outer_disable_userns: disable,
            ..Default::default()
        };
        for (text, f, want) in [
            (UNSHARE, nest(Some(32), None), "userns-nesting-limit"),
            (ENOSPC, nest(Some(33), None), "userns-nesting-limit"),
            (ENOSPC, nest(Some(2), Some(true)), "userns-disabled-outer"),
            (ENOSPC, nest(Some(1), Some(false)), "userns-limit"),
            (ENOSPC, nest(None, None), "userns-limit"),
            // max_user_namespaces=0 (userns-limit-0, a guest's max-userns-0): no nesting seen.
            (ENOSPC, Facts::default(), "userns-limit"),
        ] {
            let sig = classify(text).expect(text);
            assert_eq!(sig.name, "userns-limit", "{text}");
            let got = refine(sig, text, &f).name;
            assert_eq!(got, want, "{text} with {f:?}");
            assert!(satisfies("userns-limit", got));
            assert!(!remedy(got).is_empty());
        }
        assert!(!satisfies("userns-nesting-limit", "userns-disabled-outer"));
        // ProcSubset=pid and ProtectKernelTunables= as bwrap 0.8.0 reports them (measured).
        assert_eq!(
            name("bwrap: Can't read /proc/sys/kernel/overflowuid: No such file or directory"),
            Some("proc-sys-unreadable")
        );
        assert_eq!(
            name("bwrap: Can't mount proc on /newroot/proc: Operation not permitted"),
            Some("proc-mount-denied")
        );
        // Rows outside a family are never refined.
        let cap = classify("bwrap: capset failed: Operation not permitted").unwrap();
        assert_eq!(
            refine(cap, "", &facts(Some(true), None, None, None)).name,
            "capset-denied"
        );
    }

    /// AppArmor is named only when the cell's kernel log showed its denial; the lines are the
    /// ones bwrap printed in guests under the policy sets (vm-images/apparmor/) and on Ubuntu.
    #[test]
    fn apparmor_members_need_the_audit_line() {
        let with = |denied| Facts {
            seccomp_filter: Some(false),
            unprivileged_userns_clone: Some(true),
            sys_admin: None,
            net_admin: None,
            apparmor_denied: denied,
            ..Default::default()
        };
        // Measured: trixie's bwrap 0.12.0 under the ubuntu-like set (CAP_SYS_ADMIN denied in
        // the new user namespace: the clone's other namespaces get EPERM).
        const UNPRIV: &str = "bwrap: No permissions to create a new namespace, likely because the kernel does not allow non-privileged user namespaces. See <https://deb.li/bubblewrap> or <file:///usr/share/doc/bubblewrap/README.Debian.gz>.";
        const UID_MAP: &str = "bwrap: setting up uid map: Permission denied";
        const LOOPBACK: &str = "bwrap: loopback: Failed RTM_NEWADDR: Operation not permitted";
        let cases = [
            (UNPRIV, Some(true), "userns-denied-apparmor"),
            (UNPRIV, Some(false), "userns-denied"),
            (UNPRIV, None, "userns-denied"),
            (UID_MAP, Some(true), "uid-map-denied-apparmor"),
            (UID_MAP, Some(false), "uid-map-denied"),
            (UID_MAP, None, "uid-map-denied"),
            (LOOPBACK, Some(true), "loopback-denied-apparmor"),
            (LOOPBACK, Some(false), "net-admin-missing"),
            (LOOPBACK, None, "net-admin-missing"),
        ];
        for (text, denied, want) in cases {
            let sig = classify(text).expect(text);
            let got = refine(sig, text, &with(denied)).name;
            assert_eq!(got, want, "{text} with an AppArmor denial {denied:?}");
            assert!(satisfies(sig.name, got));
        }
        // EACCES at clone and at the first mount are AppArmor's rows from the text alone.
        for (text, want) in [
            (
                "bwrap: Creating new namespace failed: Permission denied",
                "userns-lsm-denied",
            ),
            (
                "bwrap: Failed to make / slave: Permission denied",
                "lsm-mount-denied",
            ),
        ] {
            let sig = classify(text).expect(text);
            assert_eq!(refine(sig, text, &with(Some(true))).name, want);
            assert_eq!(refine(sig, text, &with(None)).name, want);
        }
        for n in [
            "userns-denied-apparmor",
            "uid-map-denied-apparmor",
            "loopback-denied-apparmor",
            "userns-lsm-denied",
            "lsm-mount-denied",
        ] {
            let r = remedy(n);
            assert!(r.contains("bwrap-userns-restrict"), "{n}: {r}");
            assert!(r.contains("apparmor=unconfined"), "{n}: {r}");
        }
        assert!(
            with(Some(true))
                .describe()
                .contains("AppArmor denial in the kernel log: yes")
        );
    }

    #[test]
    fn a_family_is_met_by_its_members_only() {
        assert!(satisfies("userns-denied", "userns-denied-seccomp"));
        assert!(satisfies("userns-denied", "userns-denied-sysctl"));
        assert!(satisfies("userns-denied", "userns-denied-caps"));
        assert!(satisfies("userns-denied", "userns-denied"));
        assert!(satisfies("mount-denied", "mkdir-parents-denied"));
        assert!(satisfies("net-setup-denied", "loopback-preconfigured"));
        // A member is exact: neither the family nor a sibling meets it.
        assert!(!satisfies("userns-denied-seccomp", "userns-denied"));
        assert!(!satisfies("userns-denied-seccomp", "userns-denied-caps"));
        assert!(!satisfies("userns-denied", "userns-limit"));
        assert!(!satisfies("mount-denied", "lsm-mount-denied"));
        for (member, family) in FAMILIES {
            assert!(by_name(member).is_some() && by_name(family).is_some());
        }
    }
}
