//! The raw shape of `matrix.toml`, as serde reads it. Unknown keys are rejected here (with
//! their position); everything else is checked in `load`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

pub type SValue = Spanned<toml::Value>;
/// `{ axis = value, ... }`, used by exclude/include/expect selectors.
pub type Selector = BTreeMap<String, SValue>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawMatrix {
    pub settings: Option<RawSettings>,
    #[serde(default)]
    pub profile: BTreeMap<String, Spanned<RawProfile>>,
    #[serde(default)]
    pub sysctl_set: BTreeMap<String, Spanned<BTreeMap<String, SValue>>>,
    #[serde(default)]
    pub image: BTreeMap<String, Spanned<RawImage>>,
    #[serde(default)]
    pub environment: Vec<Spanned<RawEnvironment>>,
    #[serde(default)]
    pub subject: Vec<Spanned<RawSubject>>,
    #[serde(default)]
    pub scenarios: Vec<Spanned<RawScenarios>>,
    #[serde(default)]
    pub exclude: Vec<Spanned<Selector>>,
    #[serde(default)]
    pub expect: Vec<Spanned<RawExpect>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawSettings {
    pub cell_timeout: Option<Spanned<String>>,
    pub batch_timeout: Option<Spanned<String>>,
    pub retries: Option<u32>,
    pub host_work_dir: Option<String>,
    /// Backends whose cells must run: a SKIP of one of them fails the run (exit 4).
    #[serde(default)]
    pub require: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawProfile {
    #[serde(default)]
    pub description: String,
    pub seccomp: Option<Spanned<String>>,
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub cap_drop: Vec<String>,
    #[serde(default)]
    pub no_new_privileges: bool,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub systempaths_unconfined: bool,
    /// `"docker-default"` or a list of capability names.
    pub bounding_set: Option<SValue>,
    pub userns_limit: Option<u64>,
    #[serde(default)]
    pub security_opt: Vec<String>,
    /// Docker: the container's AppArmor profile (`unconfined` or a loaded profile's name);
    /// the same as `security-opt = ["apparmor=NAME"]`.
    pub apparmor: Option<String>,
    pub outer_sandbox: Option<Spanned<String>>,
    pub outer_disable_userns: Option<Spanned<bool>>,
    pub userns_depth: Option<Spanned<i64>>,
    #[serde(default)]
    pub protect_kernel_tunables: bool,
    pub protect_proc: Option<Spanned<String>>,
    pub proc_subset: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawImage {
    #[serde(default)]
    #[allow(dead_code)] // documentation for the reader of matrix.toml
    pub description: String,
    /// A recipe under vm-images/docker/ built by `nsmatrix images build`.
    pub recipe: Option<String>,
    /// Any image already in the local engine (`busybox:latest`).
    pub reference: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawEnvironment {
    pub name: Spanned<String>,
    pub backend: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for the reader of matrix.toml
    pub description: String,
    pub profile: Option<SValue>,
    pub uid: Option<SValue>,
    pub image: Option<SValue>,
    pub read_only: Option<SValue>,
    pub kernel: Option<SValue>,
    pub sysctl: Option<SValue>,
    /// qemu: the AppArmor policy sets the guest loads (`none`, `vm-images/apparmor/` sets,
    /// joined by `+`); guest-docker: `off` or `on` (the guest exposes its kernel's AppArmor
    /// to the engine, which confines containers with docker-default).
    pub apparmor: Option<SValue>,
    /// qemu: the guest's vCPUs (1 by default); with more than one its agent runs cells side
    /// by side.
    pub vcpus: Option<SValue>,
    #[serde(default)]
    pub exclude: Vec<Spanned<Selector>>,
    #[serde(default)]
    pub include: Vec<Spanned<Selector>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawSubject {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for the reader of matrix.toml
    pub description: String,
    pub build: Option<SValue>,
    pub setuid: Option<SValue>,
    pub argv: Option<SValue>,
    pub version: Option<SValue>,
    pub system_bwrap: Option<SValue>,
    #[serde(default)]
    pub exclude: Vec<Spanned<Selector>>,
    #[serde(default)]
    pub include: Vec<Spanned<Selector>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawScenarios {
    pub name: Spanned<String>,
    pub dir: Spanned<String>,
    /// Globs of scenario names to keep (default: all).
    pub only: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawExpect {
    /// Axis → value (globs allowed); `id` matches the cell id.
    pub when: Spanned<Selector>,
    pub fail: Option<Spanned<String>>,
    pub pass: Option<bool>,
    pub reason: Option<String>,
}

/// Scalar → its text; arrays are handled by the validator.
pub(super) fn scalar_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) const HOST_AXES: &[&str] = &["profile", "uid"];
/// A docker environment's `sysctl` names host values it needs (Docker cannot set `user.*` per
/// container): its cells run only where the host has them, else SKIP.
pub(super) const DOCKER_AXES: &[&str] = &["image", "profile", "uid", "read-only", "sysctl"];
pub(super) const QEMU_AXES: &[&str] = &[
    "kernel", "sysctl", "image", "uid", "profile", "apparmor", "vcpus",
];
/// A container in a guest's engine: the guest's kernel, sysctl set and AppArmor, the
/// container's image, profile, uid and read-only root.
pub(super) const GUEST_DOCKER_AXES: &[&str] = &[
    "kernel",
    "sysctl",
    "apparmor",
    "image",
    "profile",
    "uid",
    "read-only",
];
pub(super) const BWRAP_AXES: &[&str] = &["build", "setuid", "argv"];
/// `system-bwrap = "hidden"` hides `/usr/bin/bwrap` from the cell (QEMU guests), so Codex
/// runs its bundled bwrap.
pub(super) const CODEX_AXES: &[&str] = &["version", "system-bwrap"];
/// The image's own Codex has no axis: it is whatever the environment has installed.
pub(super) const IMAGE_CODEX_AXES: &[&str] = &[];
/// Axes every cell has besides its environment's and subject's.
pub(super) const CELL_AXES: &[&str] = &[
    "id",
    "backend",
    "environment",
    "subject",
    "kind",
    "set",
    "scenario",
];

pub(super) fn all_axes() -> BTreeSet<&'static str> {
    [
        HOST_AXES,
        DOCKER_AXES,
        QEMU_AXES,
        GUEST_DOCKER_AXES,
        BWRAP_AXES,
        CODEX_AXES,
        CELL_AXES,
    ]
    .concat()
    .into_iter()
    .collect()
}

/// The byte range of a value in the file (for diagnostics).
pub(super) fn span<T>(s: &Spanned<T>) -> Option<std::ops::Range<usize>> {
    Some(s.span())
}
