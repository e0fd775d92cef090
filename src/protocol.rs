//! The agent protocol: a [`BatchSpec`] goes in, [`AgentEvent`] JSON lines come out.
//!
//! This is the only contract between the harness on the host and the agent inside an
//! environment (a host process, a container exec, a guest's init). Backends move these bytes;
//! they never look inside a cell. Bump [`PROTOCOL_VERSION`] on any incompatible change.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;

/// One batch: every cell that shares one environment instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BatchSpec {
    pub version: u32,
    pub batch_id: String,
    /// A directory the agent owns for this batch (workspaces, setuid copies). Created if
    /// missing, removed when the batch ends, also on SIGINT/SIGTERM. Must not be `nosuid`.
    pub work_dir: PathBuf,
    /// The uid/gid the sandbox front end runs as. 0 is allowed (Docker's uid axis).
    pub uid: u32,
    pub gid: u32,
    /// Process-level restrictions the agent applies to each sandbox's process tree.
    #[serde(default)]
    pub restrictions: Restrictions,
    /// sysctls the agent writes before running any cell (QEMU guests only; a key that does not
    /// exist makes the affected cells SKIP, never silently pass).
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// The nsmatrix binary as seen inside the environment; `apply_patch` is a symlink to it.
    pub agent_bin: PathBuf,
    /// A text file the kernel's log is appended to as it is written (an engine guest's relay,
    /// bind-mounted into the container): the agent attributes the lines that appear during a
    /// cell to that cell, as it does with /dev/kmsg when it is a guest's init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_log: Option<PathBuf>,
    pub cells: Vec<CellSpec>,
}

/// Restrictions that the kernel applies to the sandbox's process tree; real, not simulated.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Restrictions {
    /// A seccomp filter returning EPERM for clone/unshare with CLONE_NEWUSER (and ENOSYS for
    /// clone3), like Docker's default profile does for a container without CAP_SYS_ADMIN.
    #[serde(default)]
    pub seccomp_deny_userns: bool,
    /// PR_SET_NO_NEW_PRIVS before exec: setuid bits are ignored.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// Reduce the capability bounding set to exactly these capabilities (names like
    /// `CAP_CHOWN` or `chown`).
    #[serde(default)]
    pub bounding_set: Option<Vec<String>>,
    /// Run the sandbox inside a fresh user namespace whose `user.max_user_namespaces` is this.
    #[serde(default)]
    pub userns_limit: Option<u64>,
    /// Run the cell's program inside an outer sandbox: the system's bwrap with a user
    /// namespace of its own (`--unshare-user --unshare-pid`), as when a tool runs inside
    /// another sandbox.
    #[serde(default)]
    pub outer_bwrap: bool,
    /// The outer bwrap also passes `--disable-userns` (bubblewrap 0.8+).
    #[serde(default)]
    pub outer_disable_userns: bool,
    /// Start the cell's program this many user namespaces deep (nested unshares as the cell's
    /// uid, each mapping only that uid), counted from the agent's own user namespace.
    #[serde(default)]
    pub userns_depth: Option<u32>,
    /// systemd's ProtectKernelTunables=: /proc/sys, /proc/sysrq-trigger and /sys bind-mounted
    /// read-only in a private mount namespace.
    #[serde(default)]
    pub protect_kernel_tunables: bool,
    /// systemd's ProtectProc=: a fresh procfs on /proc with `hidepid=` this value
    /// (`invisible`, `noaccess`, `ptraceable`), in a private mount namespace.
    #[serde(default)]
    pub protect_proc: Option<String>,
    /// systemd's ProcSubset=pid: a fresh procfs on /proc with `subset=pid`.
    #[serde(default)]
    pub proc_subset: Option<String>,
    /// AppArmor profiles the agent loads before any cell runs (QEMU guests only: the kernel's
    /// policy is the whole guest's). A load failure makes every cell ERROR; a kernel without
    /// AppArmor or without a feature the set requires makes them SKIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apparmor: Option<AppArmorPolicy>,
}

/// A set of AppArmor profiles (`vm-images/apparmor/<set>/`), loaded with `apparmor_parser`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AppArmorPolicy {
    /// The axis value (`ubuntu-like+bwrap-userns-restrict`).
    pub sets: String,
    pub profiles: Vec<PolicyFile>,
    /// Features under `/sys/kernel/security/apparmor/features/` the sets depend on.
    #[serde(default)]
    pub requires: Vec<String>,
}

/// One profile file: `set/file` and its text.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CellSpec {
    pub id: String,
    pub subject: SubjectSpec,
    /// The scenario directory as seen inside the environment.
    pub scenario_dir: PathBuf,
    pub timeout_ms: u64,
    /// sysctls this cell needs to exist (from the batch's sysctl set); missing → SKIP.
    #[serde(default)]
    pub needs_sysctls: Vec<String>,
}

/// How a Codex release runs a command in its Linux sandbox, read from its own `--help`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum CodexEntry {
    /// `codex sandbox [OPTIONS] -- CMD` (0.13x and later).
    Sandbox,
    /// `codex sandbox linux [OPTIONS] -- CMD` (up to 0.128.0 at least); `full_auto` when the
    /// release spells workspace-write `--full-auto` there (0.116.0 and before: `-c
    /// sandbox_mode=workspace-write` alone leaves its sandbox read-only).
    SandboxLinux { full_auto: bool },
    /// Neither: why, for the cell's SKIP.
    None(String),
}

impl CodexEntry {
    /// The arguments before Codex's options.
    pub fn args(&self) -> &'static [&'static str] {
        match self {
            CodexEntry::Sandbox => &["sandbox"],
            CodexEntry::SandboxLinux { full_auto: false } => &["sandbox", "linux"],
            CodexEntry::SandboxLinux { full_auto: true } => &["sandbox", "linux", "--full-auto"],
            CodexEntry::None(_) => &[],
        }
    }

    /// Ask `codex sandbox --help` (with `home` as its CODEX_HOME and HOME) which form this
    /// release has: a `linux` subcommand, or the command right after the options.
    pub fn detect(codex: &std::path::Path, home: &std::path::Path) -> CodexEntry {
        let help = |args: &[&str]| {
            std::process::Command::new(codex)
                .args(args)
                .env("CODEX_HOME", home)
                .env("HOME", home)
                .output()
        };
        let out = match help(&["sandbox", "--help"]) {
            Ok(o) => o,
            Err(e) => return CodexEntry::None(format!("`codex sandbox --help` did not run: {e}")),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return CodexEntry::None(format!(
                "this release has no `codex sandbox` (`codex sandbox --help` exited {}: {})",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if text.lines().any(|l| l.trim_start().starts_with("linux ")) {
            let full_auto = help(&["sandbox", "linux", "--help"])
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("--full-auto"))
                .unwrap_or(false);
            CodexEntry::SandboxLinux { full_auto }
        } else if text.contains("[COMMAND]") {
            CodexEntry::Sandbox
        } else {
            CodexEntry::None(
                "`codex sandbox --help` names neither a `linux` subcommand nor a COMMAND".into(),
            )
        }
    }
}

/// How the sandbox is entered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SubjectSpec {
    Bwrap {
        /// `system` = the first `bwrap` on PATH, otherwise an absolute path.
        build: String,
        setuid: SetuidMode,
        argv: ArgvProfile,
    },
    Codex {
        version: String,
        /// The static codex binary as seen inside the environment.
        codex_bin: PathBuf,
        /// Hide `/usr/bin/bwrap` from this cell (a QEMU guest only), so that Codex runs its
        /// bundled bwrap where it would otherwise pick the system's.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hide_system_bwrap: bool,
        /// How this release enters its sandbox, read once from its own `--help` on this
        /// machine (the same binary the environment gets); `None`: the agent reads it there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<CodexEntry>,
    },
    /// The Codex CLI the environment itself has installed (a container image's own: `codex`
    /// on PATH or in npm's global location), run where it is, as the cell's uid. An
    /// environment without one fails the cell `codex-missing`.
    ImageCodex,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum SetuidMode {
    /// Use the build as it is installed (setuid or not).
    AsIs,
    /// A root-owned 4755 copy in the batch's private directory.
    Force,
    /// A 0755 copy (drops a setuid bit the image may have).
    Never,
}

/// Which bwrap argv to build; the profiles themselves live in `sandbox::argv`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ArgvProfile {
    /// Codex's current argv (with `--unshare-user`).
    Codex,
    /// Codex's argv before early 2026 (no `--unshare-user`, `--dev-bind /dev/null`).
    CodexLegacy,
}

impl ArgvProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            ArgvProfile::Codex => "codex",
            ArgvProfile::CodexLegacy => "codex-legacy",
        }
    }
}

/// One JSON line from the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum AgentEvent {
    /// First line: who is speaking and what the environment is.
    Hello {
        version: u32,
        agent_version: String,
        facts: BTreeMap<String, String>,
    },
    CellStarted {
        id: String,
    },
    CellFinished(CellRecord),
    /// Free-form diagnostics (kept in the batch log).
    Log {
        message: String,
    },
    /// Last line of a batch that ran to its end.
    BatchDone {
        cells: usize,
    },
}

/// What happened to one cell, before it is judged against any expectation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct CellRecord {
    pub id: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    #[serde(default)]
    pub stdout_tail: String,
    #[serde(default)]
    pub stderr_tail: String,
    /// Observations: bwrap version, whether the setuid bit was in effect, the argv used, ...
    #[serde(default)]
    pub details: BTreeMap<String, String>,
}

impl CellRecord {
    /// A record with an outcome and nothing measured (a skip, an error before the sandbox ran).
    pub fn outcome_only(id: &str, outcome: Outcome) -> Self {
        CellRecord {
            id: id.to_string(),
            outcome,
            exit_code: None,
            duration_ms: 0,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            details: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    Passed,
    Failed {
        /// A signature name from `sandbox::signature` (`userns-denied`, `unknown`, ...).
        signature: String,
        message: String,
    },
    /// The harness could not get an answer (infrastructure), never a product failure.
    Error {
        stage: String,
        message: String,
    },
    Skipped {
        reason: String,
    },
}

impl AgentEvent {
    /// Parse one line of agent output; `None` for lines that are not protocol lines (a kernel
    /// message on a shared console, a shell's noise), which callers keep in the log.
    pub fn parse_line(line: &str) -> Option<Result<AgentEvent, serde_json::Error>> {
        let t = line.trim();
        if !t.starts_with('{') {
            return None;
        }
        Some(serde_json::from_str(t))
    }

    pub fn to_line(&self) -> String {
        // Serialising these plain data types cannot fail.
        let mut s = serde_json::to_string(self).expect("agent event serialises");
        s.push('\n');
        s
    }
}

/// The one splitter of an agent's output, whatever carries it (a pipe, a container's attach
/// stream, a file a guest's serial port writes): bytes in as they arrive, whole lines out
/// (`\n` or `\r\n` ended, invalid UTF-8 replaced); [`AgentEvent::parse_line`] then tells a
/// protocol line from noise.
#[derive(Debug, Default)]
pub struct LineBuf {
    partial: Vec<u8>,
}

impl LineBuf {
    /// The lines `chunk` completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            lines.push(text_of(&line));
        }
        lines
    }

    /// What is left after the last newline, at the end of the stream.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| text_of(&std::mem::take(&mut self.partial)))
    }
}

fn text_of(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end_matches(['\r', '\n'])
        .to_string()
}

/// Where a batch's files go inside an environment (a container, a guest).
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    /// The agent binary.
    pub agent: &'a str,
    /// Scenarios go under `<root>/scenarios/`, Codex packages under `<root>/codex/`.
    pub root: &'a str,
    /// The batch's work dir.
    pub work_dir: &'a str,
}

/// One host file or directory a transport carries into the environment, to `inside`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carry {
    File {
        host: PathBuf,
        inside: String,
        mode: u32,
    },
    Dir {
        host: PathBuf,
        inside: String,
    },
}

/// The one relocation of a batch, used by every transport that copies a batch into an
/// environment: `spec` with every host path rewritten to `layout`'s, and what to carry there
/// (the agent first, each scenario directory once, each Codex package's binary and its bundled
/// bwrap once, in Codex's package layout so it finds `../codex-resources/bwrap`). No file is
/// read; only whether a Codex package that exists has a bundled bwrap is looked at.
pub fn relocate(spec: &BatchSpec, layout: &Layout<'_>) -> (BatchSpec, Vec<Carry>) {
    let mut spec = spec.clone();
    let mut carry = vec![Carry::File {
        host: spec.agent_bin.clone(),
        inside: layout.agent.to_string(),
        mode: 0o755,
    }];
    spec.agent_bin = PathBuf::from(layout.agent);
    spec.work_dir = PathBuf::from(layout.work_dir);
    let root = layout.root.trim_end_matches('/');
    let mut scenarios: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut codex: BTreeMap<PathBuf, String> = BTreeMap::new();
    for cell in &mut spec.cells {
        let n = scenarios.len();
        let inside = scenarios
            .entry(cell.scenario_dir.clone())
            .or_insert_with(|| format!("{root}/scenarios/{n}-{}", base_name(&cell.scenario_dir)))
            .clone();
        cell.scenario_dir = PathBuf::from(inside);
        if let SubjectSpec::Codex { codex_bin, .. } = &mut cell.subject {
            let n = codex.len();
            let inside = codex
                .entry(codex_bin.clone())
                .or_insert_with(|| format!("{root}/codex/{n}"))
                .clone();
            *codex_bin = PathBuf::from(format!("{inside}/bin/codex"));
        }
    }
    carry.extend(
        scenarios
            .into_iter()
            .map(|(host, inside)| Carry::Dir { host, inside }),
    );
    for (host, inside) in codex {
        let codex_there = host.is_file();
        let bundled = host
            .parent()
            .and_then(std::path::Path::parent)
            .map(|d| d.join("codex-resources/bwrap"));
        carry.push(Carry::File {
            host,
            inside: format!("{inside}/bin/codex"),
            mode: 0o755,
        });
        // A package that is there without a bundled bwrap (Codex before 0.129.0) carries
        // its binary alone.
        let without_bwrap = |b: &std::path::Path| codex_there && !b.is_file();
        if let Some(b) = bundled.filter(|b| !without_bwrap(b)) {
            carry.push(Carry::File {
                host: b,
                inside: format!("{inside}/codex-resources/bwrap"),
                mode: 0o755,
            });
        }
    }
    (spec, carry)
}

/// A path's last component as a safe file name.
fn base_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| "scenario".into())
}

/// The contract between the host and a guest whose init starts a Docker engine
/// (`nsmatrix.mode=engine`): what the guest's PID 1 is told, and the names both sides use.
pub mod engine {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    /// The engine spec in the per-boot part of the initramfs (the guest's view).
    pub const GUEST_ENGINE_SPEC: &str = "/nsmatrix/engine.json";
    /// AppArmor's tools (`apparmor_parser`, `/etc/apparmor.d`) in the engine guest's initramfs,
    /// a tree laid out as in the root file system.
    pub const GUEST_APPARMOR_TOOLS: &str = "/nsmatrix/apparmor";
    /// The virtio-serial port the host writes `stop` to.
    pub const CONTROL_PORT: &str = "nsmatrix.control";
    /// Printed on the console when dockerd has been started.
    pub const ENGINE_READY_MARK: &str = "nsmatrix-engine: dockerd started";
    /// Where the Codex disk is mounted in the guest (read-only).
    pub const GUEST_CODEX_DIR: &str = "/opt/codex";
    /// The guest's copy of its nsmatrix binary (the host's build), which containers bind-mount as
    /// their agent.
    pub const GUEST_AGENT_COPY: &str = "/run/nsmatrix-agent";
    /// The guest kernel's log as text lines, appended by the guest's init as the kernel writes
    /// it, for containers to bind-mount read-only: a container cannot read /dev/kmsg, and its
    /// agent attributes the lines that appear during a cell to that cell.
    pub const GUEST_KERNEL_LOG: &str = "/run/nsmatrix-kernel.log";
    /// dockerd's API socket in the guest; the guest's init forwards the TCP port QEMU forwards
    /// to it (dockerd listening on TCP without TLS sleeps a deliberate second at start).
    pub const DOCKERD_SOCKET: &str = "/run/docker.sock";
    /// containerd's socket and configuration in the guest, when the init starts it before
    /// dockerd (as distributions' service units do).
    pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
    pub const CONTAINERD_CONFIG: &str = "/run/containerd/config.toml";
    /// Printed by a bare boot (no disks, no engine) just before powering off.
    pub const BARE_MARK: &str = "nsmatrix-engine: bare boot done";

    /// Virtio serial numbers of the disks (the guest finds them by these, not by order).
    pub const SERIAL_ROOT: &str = "nsm-engine-root";
    pub const SERIAL_DATA: &str = "nsm-engine-data";
    pub const SERIAL_CODEX: &str = "nsm-codex";

    /// What the guest's PID 1 is told (serialised into the initramfs).
    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "kebab-case")]
    pub struct EngineSpec {
        pub sysctls: BTreeMap<String, String>,
        pub dockerd_args: Vec<String>,
        /// Power off right after init (a bare boot, for timing).
        #[serde(default)]
        pub bare: bool,
        #[serde(default)]
        pub data_disk: bool,
        #[serde(default)]
        pub codex_disk: bool,
        /// containerd's configuration: the init writes it to [`CONTAINERD_CONFIG`], starts
        /// containerd and waits for [`CONTAINERD_SOCKET`] before it starts dockerd (whose args
        /// then name that socket). `None`: dockerd starts a containerd of its own.
        #[serde(default)]
        pub containerd_config: Option<String>,
        /// The init forwards TCP connections on this port to [`DOCKERD_SOCKET`].
        #[serde(default)]
        pub api_port: Option<u16>,
        /// Expose the kernel's AppArmor to the engine, as a Debian or Ubuntu Docker host does:
        /// the init copies AppArmor's tools from [`GUEST_APPARMOR_TOOLS`] into the root file
        /// system and mounts securityfs, so dockerd confines containers with `docker-default`.
        /// A kernel without AppArmor enabled fails the boot.
        #[serde(default)]
        pub apparmor: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_roundtrip_and_noise() {
        let ev = AgentEvent::CellFinished(CellRecord {
            id: "a/b/c/d".into(),
            outcome: Outcome::Failed {
                signature: "userns-denied".into(),
                message: "bwrap: No permissions".into(),
            },
            exit_code: Some(1),
            duration_ms: 12,
            stdout_tail: String::new(),
            stderr_tail: "x\u{1b}[0m]]>".into(),
            details: BTreeMap::new(),
        });
        let line = ev.to_line();
        assert!(line.ends_with('\n'));
        assert_eq!(AgentEvent::parse_line(&line).unwrap().unwrap(), ev);
        assert!(AgentEvent::parse_line("[    0.1] Linux version").is_none());
        assert!(AgentEvent::parse_line("{broken").unwrap().is_err());
    }

    #[test]
    fn batch_spec_rejects_unknown_fields() {
        let j = r#"{"version":1,"batch-id":"b","work-dir":"/w","uid":1000,"gid":1000,
                   "agent-bin":"/a","cells":[],"bogus":1}"#;
        assert!(serde_json::from_str::<BatchSpec>(j).is_err());
    }

    #[test]
    fn a_codex_package_without_a_bundled_bwrap_carries_its_binary_alone() {
        let pkg = tempfile::tempdir().unwrap();
        let bin = pkg.path().join("bin/codex");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, b"codex").unwrap();
        let spec = BatchSpec {
            version: 1,
            batch_id: "b".into(),
            work_dir: "/host/w".into(),
            uid: 1000,
            gid: 1000,
            restrictions: Default::default(),
            sysctls: Default::default(),
            agent_bin: "/host/nsmatrix".into(),
            kernel_log: None,
            cells: vec![CellSpec {
                id: "1".into(),
                subject: SubjectSpec::Codex {
                    version: "0.116.0".into(),
                    codex_bin: bin.clone(),
                    hide_system_bwrap: false,
                    entry: None,
                },
                scenario_dir: "/s/a".into(),
                timeout_ms: 1000,
                needs_sysctls: vec![],
            }],
        };
        let layout = Layout {
            agent: "/in/bin/nsmatrix",
            root: "/in",
            work_dir: "/work",
        };
        let files = |carry: &[Carry]| {
            carry
                .iter()
                .filter_map(|c| match c {
                    Carry::File { inside, .. } => Some(inside.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let (_, carry) = relocate(&spec, &layout);
        assert_eq!(files(&carry), ["/in/bin/nsmatrix", "/in/codex/0/bin/codex"]);
        // With one (0.129.0 and later) it goes along in the package's layout.
        let bundled = pkg.path().join("codex-resources/bwrap");
        std::fs::create_dir_all(bundled.parent().unwrap()).unwrap();
        std::fs::write(&bundled, b"bwrap").unwrap();
        let (_, carry) = relocate(&spec, &layout);
        assert_eq!(
            files(&carry),
            [
                "/in/bin/nsmatrix",
                "/in/codex/0/bin/codex",
                "/in/codex/0/codex-resources/bwrap"
            ]
        );
    }

    #[test]
    fn relocation_rewrites_every_host_path_and_carries_each_once() {
        let cell = |id: &str, dir: &str, subject: SubjectSpec| CellSpec {
            id: id.into(),
            subject,
            scenario_dir: dir.into(),
            timeout_ms: 1000,
            needs_sysctls: vec![],
        };
        let bwrap = SubjectSpec::Bwrap {
            build: "system".into(),
            setuid: SetuidMode::AsIs,
            argv: ArgvProfile::Codex,
        };
        let codex = SubjectSpec::Codex {
            version: "1".into(),
            codex_bin: "/h/pkg/bin/codex".into(),
            hide_system_bwrap: false,
            entry: None,
        };
        let spec = BatchSpec {
            version: 1,
            batch_id: "b".into(),
            work_dir: "/host/w".into(),
            uid: 1000,
            gid: 1000,
            restrictions: Default::default(),
            sysctls: Default::default(),
            agent_bin: "/host/nsmatrix".into(),
            kernel_log: None,
            cells: vec![
                cell("1", "/s/a", bwrap.clone()),
                cell("2", "/s/b c", codex.clone()),
                cell("3", "/s/a", codex),
            ],
        };
        let layout = Layout {
            agent: "/in/bin/nsmatrix",
            root: "/in",
            work_dir: "/work",
        };
        let (g, carry) = relocate(&spec, &layout);
        assert_eq!(g.agent_bin, PathBuf::from("/in/bin/nsmatrix"));
        assert_eq!(g.work_dir, PathBuf::from("/work"));
        assert_eq!(g.cells[0].scenario_dir, PathBuf::from("/in/scenarios/0-a"));
        assert_eq!(
            g.cells[1].scenario_dir,
            PathBuf::from("/in/scenarios/1-b_c")
        );
        assert_eq!(g.cells[2].scenario_dir, g.cells[0].scenario_dir);
        for c in &g.cells[1..] {
            assert!(
                matches!(&c.subject, SubjectSpec::Codex { codex_bin, .. } if codex_bin == &PathBuf::from("/in/codex/0/bin/codex")),
                "{:?}",
                c.subject
            );
        }
        // No host path is left in the relocated spec.
        let json = serde_json::to_string(&g).unwrap();
        for host in ["/host/", "/s/", "/h/"] {
            assert!(!json.contains(host), "{host} left in {json}");
        }
        // The agent, two scenario dirs, Codex and its bundled bwrap.
        assert_eq!(carry.len(), 5, "{carry:?}");
        assert_eq!(
            carry[0],
            Carry::File {
                host: "/host/nsmatrix".into(),
                inside: "/in/bin/nsmatrix".into(),
                mode: 0o755
            }
        );
        assert!(carry.contains(&Carry::File {
            host: "/h/pkg/codex-resources/bwrap".into(),
            inside: "/in/codex/0/codex-resources/bwrap".into(),
            mode: 0o755
        }));
    }

    #[test]
    fn lines_split_across_chunks_and_at_the_end() {
        let mut b = LineBuf::default();
        assert!(b.push(b"{\"event\":").is_empty());
        let l = b.push(b"\"batch-done\",\"cells\":1}\r\nnoise\npart");
        assert_eq!(l.len(), 2);
        assert_eq!(
            AgentEvent::parse_line(&l[0]).unwrap().unwrap(),
            AgentEvent::BatchDone { cells: 1 }
        );
        assert_eq!(l[1], "noise");
        assert_eq!(b.finish().as_deref(), Some("part"));
        assert_eq!(b.finish(), None);
    }
}
