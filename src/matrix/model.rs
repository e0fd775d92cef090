//! The validated matrix: [`Cell`]s, each an [`Environment`] × a subject × a scenario, with an
//! [`Expectation`]. Built from `matrix.toml` by `matrix::load`; nothing here does I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::SubjectSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Host,
    Docker,
    Qemu,
    /// Containers of a Docker engine running inside a QEMU guest of a chosen kernel.
    GuestDocker,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Host => "host",
            BackendKind::Docker => "docker",
            BackendKind::Qemu => "qemu",
            BackendKind::GuestDocker => "guest-docker",
        }
    }
}

/// A named set of restrictions (`[profile.NAME]` in matrix.toml). The host backend applies the
/// process-level ones itself; the Docker backend maps them onto a container's HostConfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Profile {
    pub name: String,
    /// Docker: `default` (the engine's profile), `unconfined`, or a path to a JSON profile.
    /// Host: `none` or `deny-userns` (nsmatrix's own filter).
    pub seccomp: Option<String>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub no_new_privileges: bool,
    pub privileged: bool,
    /// Docker's `systempaths=unconfined` (no masked /proc paths).
    pub systempaths_unconfined: bool,
    /// Host: reduce the bounding set to exactly these capabilities.
    pub bounding_set: Option<Vec<String>>,
    /// Host: run inside a user namespace whose max_user_namespaces is this.
    pub userns_limit: Option<u64>,
    /// Host and qemu: run the cell inside an outer sandbox (`"bwrap"`: the system's bwrap).
    pub outer_sandbox: Option<String>,
    /// Host and qemu: the outer bwrap passes `--disable-userns`.
    pub outer_disable_userns: bool,
    /// Host and qemu: start the cell this many user namespaces deep.
    pub userns_depth: Option<u32>,
    /// Host and qemu: systemd's ProtectKernelTunables= (read-only /proc/sys, /sys).
    pub protect_kernel_tunables: bool,
    /// Host and qemu: systemd's ProtectProc= (`invisible`, `noaccess`, `ptraceable`).
    pub protect_proc: Option<String>,
    /// Host and qemu: systemd's ProcSubset= (`pid`, or `all` for none).
    pub proc_subset: Option<String>,
    /// Docker: any further `--security-opt` strings (apparmor=..., label=...).
    pub security_opt: Vec<String>,
    pub description: String,
}

impl Profile {
    /// Whether it sets a nesting or systemd-hardening key (host and qemu only).
    pub fn has_nesting_or_hardening(&self) -> bool {
        self.outer_sandbox.is_some()
            || self.outer_disable_userns
            || self.userns_depth.is_some()
            || self.protect_kernel_tunables
            || self.protect_proc.is_some()
            || self.proc_subset.is_some()
    }
}

/// Where cells run. One `Environment` = one batch = one process/container/guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Environment {
    /// Stable, readable id (`host-seccomp-deny-userns`, `docker-bookworm-suid-holyclaude-uid1000`).
    pub id: String,
    /// The `[[environment]]` entry's name.
    pub name: String,
    /// The axis values that made this environment (`profile`, `image`, `kernel`, `uid`, ...).
    pub axes: BTreeMap<String, String>,
    pub uid: u32,
    /// What only its backend reads, validated by `matrix/` for that backend.
    pub kind: EnvKind,
}

impl Environment {
    pub fn backend(&self) -> BackendKind {
        match self.kind {
            EnvKind::Host(_) => BackendKind::Host,
            EnvKind::Docker(_) => BackendKind::Docker,
            EnvKind::Qemu(_) => BackendKind::Qemu,
            EnvKind::GuestDocker(_) => BackendKind::GuestDocker,
        }
    }

    /// The host part, when this is a host environment.
    pub fn host(&self) -> Option<&HostEnv> {
        match &self.kind {
            EnvKind::Host(h) => Some(h),
            _ => None,
        }
    }

    /// The container part, when this is a docker environment or a container in a guest's
    /// engine (the docker layer reads the same fields in both).
    pub fn docker(&self) -> Option<&DockerEnv> {
        match &self.kind {
            EnvKind::Docker(d) => Some(d),
            EnvKind::GuestDocker(g) => Some(&g.container),
            _ => None,
        }
    }

    /// The guest part, when this is a container in a guest's engine.
    pub fn guest_docker(&self) -> Option<&GuestDockerEnv> {
        match &self.kind {
            EnvKind::GuestDocker(g) => Some(g),
            _ => None,
        }
    }

    /// The guest part, when this is a qemu environment.
    pub fn qemu(&self) -> Option<&QemuEnv> {
        match &self.kind {
            EnvKind::Qemu(q) => Some(q),
            _ => None,
        }
    }
}

/// One variant per backend kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum EnvKind {
    Host(HostEnv),
    Docker(DockerEnv),
    Qemu(QemuEnv),
    GuestDocker(GuestDockerEnv),
}

/// This machine, under process-level restrictions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostEnv {
    /// A profile with host settings only (checked at load).
    pub profile: Option<Profile>,
}

/// A container of a local or remote engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DockerEnv {
    /// The image name from `[image.NAME]` (checked at load).
    pub image: String,
    /// Where the image comes from (`[image.NAME]`).
    pub image_source: Option<ImageSource>,
    /// A profile with container settings only (checked at load).
    pub profile: Option<Profile>,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
    /// Host sysctl values the cells need (Docker cannot set them per container): checked
    /// against the host, never set.
    pub sysctls: BTreeMap<String, String>,
}

/// A QEMU guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QemuEnv {
    /// The kernel's catalog name (checked against the catalog at load).
    pub kernel: String,
    /// The root filesystem (a Debian suite or `[image.NAME]`); `None`: the kernel's own.
    pub image: Option<String>,
    /// The sysctl values the guest's agent writes before its cells run.
    pub sysctls: BTreeMap<String, String>,
    /// A profile of process-level restrictions the guest's agent applies to each cell, as the
    /// host backend's agent does (`none` by default).
    #[serde(default)]
    pub profile: Option<Profile>,
    /// The AppArmor policy sets the guest's agent loads before its cells run (`none`, a set
    /// of `vm-images/apparmor/`, or several joined by `+`; checked at load).
    #[serde(default = "apparmor_none")]
    pub apparmor: String,
    /// The guest's vCPUs (`-smp`): with more than one its agent runs cells side by side.
    #[serde(default = "one_vcpu")]
    pub vcpus: u32,
}

fn one_vcpu() -> u32 {
    1
}

fn apparmor_none() -> String {
    crate::artifacts::apparmor::NONE.to_string()
}

/// A container of the Docker engine inside a QEMU guest: the qemu layer's kernel and sysctls
/// (one guest boot per kernel × sysctl set serves all its containers) under the docker layer's
/// container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDockerEnv {
    /// The kernel's catalog name (checked against the catalog at load).
    pub kernel: String,
    /// The sysctl values the guest writes before its engine starts.
    pub sysctls: BTreeMap<String, String>,
    /// The guest exposes its kernel's AppArmor to the engine (securityfs, `apparmor_parser`),
    /// so dockerd confines containers with `docker-default` as on a Debian or Ubuntu host.
    #[serde(default)]
    pub apparmor: bool,
    /// The container (its `sysctls` are empty: the guest's are above).
    pub container: DockerEnv,
}

impl GuestDockerEnv {
    /// What one guest serves: its kernel and sysctls.
    pub fn guest_key(&self) -> String {
        let mut k = self.kernel.clone();
        for (n, v) in &self.sysctls {
            k.push_str(&format!(" {n}={v}"));
        }
        if self.apparmor {
            k.push_str(" apparmor");
        }
        k
    }
}

/// `[image.NAME]`: built here from a recipe, or any image already in the local engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageSource {
    /// A recipe name under `vm-images/docker/` (built by `nsmatrix images build`).
    Recipe(String),
    /// An existing local image reference (`busybox:latest`).
    Reference(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Subject {
    /// `bwrap-system+setuid+codex`, `codex-0.171.0`.
    pub id: String,
    pub name: String,
    pub axes: BTreeMap<String, String>,
    pub spec: SubjectSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ScenarioRef {
    /// The scenario set's name.
    pub set: String,
    pub name: String,
    /// The scenario's directory on the host (absolute).
    pub dir: PathBuf,
}

/// What the matrix author says should happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Expectation {
    Pass,
    Fail {
        signature: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cell {
    /// `<environment>/<subject>/<scenario set>/<scenario>`.
    pub id: String,
    pub env: Environment,
    pub subject: Subject,
    pub scenario: ScenarioRef,
    pub expect: Expectation,
    /// Every axis of the cell, environment's, subject's and scenario's, for filters and reports.
    pub axes: BTreeMap<String, String>,
    /// Set when the cell cannot run as specified (the reason is the SKIP message).
    pub skip: Option<String>,
}

/// Run-wide settings from `[settings]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub cell_timeout: Duration,
    pub batch_timeout: Duration,
    /// How often a batch whose cells ended in ERROR is run again (never for FAIL).
    pub retries: u32,
    /// Host backend: where batches' private directories go (must allow setuid).
    pub host_work_dir: PathBuf,
    /// Backends whose cells must run (`host`, `docker`, `qemu`): a SKIP of one of their cells
    /// is lost coverage and fails the run with exit code 4.
    pub require: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cell_timeout: Duration::from_secs(60),
            batch_timeout: Duration::from_secs(600),
            retries: 1,
            host_work_dir: PathBuf::from("/var/tmp/nsmatrix"),
            require: Vec::new(),
        }
    }
}

/// The whole validated matrix.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub path: PathBuf,
    pub settings: Settings,
    pub cells: Vec<Cell>,
}
