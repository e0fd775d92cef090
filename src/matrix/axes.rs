//! The environment and subject entries of `matrix.toml`: their axes per backend or kind,
//! defaults, validation of each value, and the ids they give cells.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;

use super::load::{Validator, Values, axis_label, sanitize, varying_axes};
use super::model::*;
use super::raw::span;
use super::raw::*;
use crate::protocol::{ArgvProfile, SetuidMode, SubjectSpec};

/// The most vCPUs a guest may have (a guest takes one job slot per vCPU, clamped to `--jobs`).
const MAX_GUEST_VCPUS: u32 = 16;

/// Backends whose environments are containers (the docker layer's profiles and images).
fn is_container(backend: BackendKind) -> bool {
    matches!(backend, BackendKind::Docker | BackendKind::GuestDocker)
}

/// A profile sets something only a container has (capabilities, privileged, masked paths,
/// security options, an engine's seccomp profile): meaningless for a host's or guest's agent.
fn container_only(p: &Profile) -> bool {
    !p.cap_add.is_empty()
        || !p.cap_drop.is_empty()
        || p.privileged
        || p.systempaths_unconfined
        || !p.security_opt.is_empty()
        || p.seccomp
            .as_deref()
            .is_some_and(|s| s != "none" && s != "deny-userns")
}

impl Validator<'_> {
    pub(super) fn environment(
        &mut self,
        e: &Spanned<RawEnvironment>,
        profiles: &BTreeMap<String, (Profile, Range<usize>)>,
        sysctl_sets: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Vec<Environment> {
        let r = e.get_ref();
        let name = r.name.get_ref().clone();
        let backend = match r.backend.get_ref().as_str() {
            "host" => BackendKind::Host,
            "docker" => BackendKind::Docker,
            "qemu" => BackendKind::Qemu,
            "guest-docker" => BackendKind::GuestDocker,
            other => {
                self.err(
                    "bad-value",
                    span(&r.backend),
                    format!("unknown backend `{other}`"),
                )
                .help("use host, docker, qemu or guest-docker");
                return Vec::new();
            }
        };
        let allowed = match backend {
            BackendKind::Host => HOST_AXES,
            BackendKind::Docker => DOCKER_AXES,
            BackendKind::Qemu => QEMU_AXES,
            BackendKind::GuestDocker => GUEST_DOCKER_AXES,
        };
        let given: [(&'static str, &Option<SValue>); 8] = [
            ("profile", &r.profile),
            ("uid", &r.uid),
            ("image", &r.image),
            ("read-only", &r.read_only),
            ("kernel", &r.kernel),
            ("sysctl", &r.sysctl),
            ("apparmor", &r.apparmor),
            ("vcpus", &r.vcpus),
        ];
        let what = format!("a {} environment", backend.as_str());
        let owner = format!("environment `{name}` ({})", backend.as_str());
        let Some(axes) =
            self.collect_axes(&what, &owner, span(&r.name), &given, allowed, |k| match k {
                "uid" => Some("1000"),
                "read-only" => Some("false"),
                "sysctl" => Some("default"),
                "apparmor" if backend == BackendKind::GuestDocker => Some("off"),
                "apparmor" => Some(crate::artifacts::apparmor::NONE),
                "vcpus" => Some("1"),
                "profile" if is_container(backend) => Some("default"),
                "profile" => Some("none"),
                // A guest runs the root filesystem its kernel's catalog entry names.
                "image" if backend == BackendKind::Qemu => Some("kernel-default"),
                _ => None,
            })
        else {
            return Vec::new();
        };
        let combos = self.expand(
            &format!("environment `{name}`"),
            axes,
            &r.exclude,
            &r.include,
        );
        if combos.is_empty() {
            self.err(
                "empty-product",
                span(e),
                format!("environment `{name}` expands to nothing (everything excluded)"),
            );
        }
        let varying = varying_axes(&combos);
        let mut out = Vec::new();
        // Each bad value is reported once, not once per combination it is in.
        let mut bad_apparmor = std::collections::BTreeSet::new();
        for c in combos {
            let val = |k: &str| c.get(k).map(|v| v.0.clone()).unwrap_or_default();
            let sp = |k: &str| c.get(k).and_then(|v| v.1.clone());
            let uid = match val("uid").parse::<u32>() {
                Ok(u) => u,
                Err(_) => {
                    self.err(
                        "bad-axis-value",
                        sp("uid"),
                        format!("uid `{}` is not a number", val("uid")),
                    );
                    continue;
                }
            };
            // guest-docker: whether the guest exposes its AppArmor to the engine.
            let engine_apparmor = backend == BackendKind::GuestDocker
                && match val("apparmor").as_str() {
                    "on" => true,
                    "off" | "" => false,
                    other if !bad_apparmor.insert(other.to_string()) => false,
                    other => {
                        self.err(
                        "bad-axis-value",
                        sp("apparmor"),
                        format!("apparmor `{other}` is not on or off"),
                    )
                    .help("on: the guest exposes its kernel's AppArmor to the engine, which confines containers with docker-default; off: as a host without AppArmor");
                        false
                    }
                };
            let read_only = match val("read-only").as_str() {
                "true" => true,
                "false" | "" => false,
                other => {
                    self.err(
                        "bad-axis-value",
                        sp("read-only"),
                        format!("read-only `{other}` is not true or false"),
                    );
                    false
                }
            };
            let profile = if allowed.contains(&"profile") {
                let pname = val("profile");
                match profiles.get(&pname) {
                    Some((p, _)) => {
                        self.check_profile_for(backend, p, sp("profile"));
                        Some(p.clone())
                    }
                    None if pname == "none"
                        && matches!(backend, BackendKind::Host | BackendKind::Qemu) =>
                    {
                        Some(Profile {
                            name: "none".into(),
                            ..Default::default()
                        })
                    }
                    None if pname == "default" && is_container(backend) => Some(Profile {
                        name: "default".into(),
                        ..Default::default()
                    }),
                    None => {
                        self.err(
                            "bad-axis-value",
                            sp("profile"),
                            format!("no profile named `{pname}`"),
                        )
                        .help(format!(
                            "define [profile.{pname}] or use one of: {}",
                            profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                        ));
                        None
                    }
                }
            } else {
                None
            };
            let image = allowed
                .contains(&"image")
                .then(|| val("image"))
                .filter(|i| i != "kernel-default");
            if let Some(img) = &image
                && is_container(backend)
                && !self.raw.image.contains_key(img)
            {
                self.err(
                    "bad-axis-value",
                    sp("image"),
                    format!("no image named `{img}`"),
                )
                .help(format!("define [image.{img}] with a recipe or a reference"));
            }
            let image_source = match (backend, &image) {
                (BackendKind::Docker | BackendKind::Qemu | BackendKind::GuestDocker, Some(img)) => {
                    match self.raw.image.get(img).map(|i| i.get_ref()) {
                        Some(RawImage {
                            reference: Some(r),
                            recipe: None,
                            ..
                        }) => Some(ImageSource::Reference(r.clone())),
                        Some(RawImage {
                            recipe: Some(r),
                            reference: None,
                            ..
                        }) => Some(ImageSource::Recipe(r.clone())),
                        Some(_) => {
                            self.err(
                                "bad-image",
                                sp("image"),
                                format!(
                                    "image `{img}` needs exactly one of `recipe` or `reference`"
                                ),
                            );
                            None
                        }
                        // QEMU images may name a root filesystem recipe directly.
                        None => {
                            (backend == BackendKind::Qemu).then(|| ImageSource::Recipe(img.clone()))
                        }
                    }
                }
                _ => None,
            };
            // A guest's kernel and root filesystem come from the catalog: a misspelt name is
            // bad input here, not an ERROR at provisioning.
            let kernel = allowed.contains(&"kernel").then(|| val("kernel"));
            if matches!(backend, BackendKind::Qemu | BackendKind::GuestDocker) {
                let catalog = crate::artifacts::kernels::Catalog::builtin();
                if let Some(k) = &kernel
                    && !catalog.kernels.iter().any(|c| &c.name == k)
                {
                    let names: Vec<&str> =
                        catalog.kernels.iter().map(|c| c.name.as_str()).collect();
                    self.err(
                        "bad-axis-value",
                        sp("kernel"),
                        format!("no kernel named `{k}` in the kernel catalog"),
                    )
                    .help(format!(
                        "use one of: {} (vm-images/kernels.toml)",
                        names.join(", ")
                    ));
                }
                let mut suites: Vec<&str> =
                    catalog.kernels.iter().map(|c| c.rootfs.as_str()).collect();
                suites.sort();
                suites.dedup();
                if let Some(img) = &image
                    && backend == BackendKind::Qemu
                    && !self.raw.image.contains_key(img)
                    && !suites.contains(&img.as_str())
                {
                    self.err(
                        "bad-axis-value",
                        sp("image"),
                        format!("no image or root filesystem named `{img}`"),
                    )
                    .help(format!(
                        "use kernel-default, a Debian suite of the kernel catalog ({}), or define [image.{img}]",
                        suites.join(", ")
                    ));
                }
            }
            let sysctls = if allowed.contains(&"sysctl") {
                let s = val("sysctl");
                match sysctl_sets.get(&s) {
                    Some(v) => v.clone(),
                    None => {
                        self.err(
                            "bad-axis-value",
                            sp("sysctl"),
                            format!("no sysctl set named `{s}`"),
                        )
                        .help(format!("define [sysctl-set.{s}]"));
                        BTreeMap::new()
                    }
                }
            } else {
                BTreeMap::new()
            };
            // qemu: the policy sets the guest loads.
            let apparmor = if backend == BackendKind::Qemu {
                let a = val("apparmor");
                if let Err(bad) = crate::artifacts::apparmor::parse(&a) {
                    self.err(
                        "bad-axis-value",
                        sp("apparmor"),
                        format!("no AppArmor policy set named `{bad}`"),
                    )
                    .help(format!(
                        "use one of: {} (vm-images/apparmor/), or several joined by `+`",
                        crate::artifacts::apparmor::names().join(", ")
                    ));
                }
                a
            } else {
                crate::artifacts::apparmor::NONE.to_string()
            };
            // qemu: the guest's vCPUs.
            let vcpus = if backend == BackendKind::Qemu {
                match val("vcpus").parse::<u32>() {
                    Ok(n) if (1..=MAX_GUEST_VCPUS).contains(&n) => n,
                    _ => {
                        self.err(
                            "bad-axis-value",
                            sp("vcpus"),
                            format!(
                                "vcpus `{}` is not a number from 1 to {MAX_GUEST_VCPUS}",
                                val("vcpus")
                            ),
                        )
                        .help("the guest's vCPUs: 1 (cells one after another) or more (its agent runs cells side by side)");
                        1
                    }
                }
            } else {
                1
            };
            let mut id = name.clone();
            for k in allowed {
                if varying.contains(*k) {
                    id.push('-');
                    id.push_str(&axis_label(k, &val(k)));
                }
            }
            let mut axes: BTreeMap<String, String> =
                c.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
            axes.insert("backend".into(), backend.as_str().into());
            axes.insert("environment".into(), name.clone());
            let kind = match backend {
                BackendKind::Host => EnvKind::Host(HostEnv { profile }),
                BackendKind::Docker => match image {
                    Some(image) => EnvKind::Docker(DockerEnv {
                        image,
                        image_source,
                        profile,
                        read_only,
                        sysctls,
                    }),
                    None => {
                        self.err(
                            "bad-axis-value",
                            span(&r.name),
                            format!("environment `{name}` names no image"),
                        )
                        .help("give it image = \"NAME\" with an [image.NAME]");
                        continue;
                    }
                },
                BackendKind::Qemu => EnvKind::Qemu(QemuEnv {
                    kernel: kernel.unwrap_or_default(),
                    image,
                    sysctls,
                    profile,
                    apparmor,
                    vcpus,
                }),
                BackendKind::GuestDocker => match image {
                    Some(image) => EnvKind::GuestDocker(GuestDockerEnv {
                        kernel: kernel.unwrap_or_default(),
                        sysctls,
                        apparmor: engine_apparmor,
                        container: DockerEnv {
                            image,
                            image_source,
                            profile,
                            read_only,
                            sysctls: BTreeMap::new(),
                        },
                    }),
                    None => {
                        self.err(
                            "bad-axis-value",
                            span(&r.name),
                            format!("environment `{name}` names no image"),
                        )
                        .help("give it image = \"NAME\" with an [image.NAME]");
                        continue;
                    }
                },
            };
            out.push(Environment {
                id,
                name: name.clone(),
                axes,
                uid,
                kind,
            });
        }
        out
    }

    pub(super) fn check_profile_for(
        &mut self,
        backend: BackendKind,
        p: &Profile,
        sp: Option<Range<usize>>,
    ) {
        match backend {
            BackendKind::Host => {
                if container_only(p) {
                    self.err("profile-backend", sp.clone(), format!("profile `{}` uses settings only a docker environment has", p.name))
                        .help("a host profile may set seccomp = \"deny-userns\", no-new-privileges, bounding-set, userns-limit, outer-sandbox, outer-disable-userns, userns-depth, protect-kernel-tunables, protect-proc, proc-subset");
                }
                if p.seccomp.as_deref() == Some("deny-userns") && p.userns_limit.is_some() {
                    self.err(
                        "profile-backend",
                        sp,
                        format!(
                            "profile `{}`: seccomp deny-userns and userns-limit cannot combine",
                            p.name
                        ),
                    );
                }
            }
            BackendKind::Docker | BackendKind::GuestDocker => {
                if p.bounding_set.is_some()
                    || p.userns_limit.is_some()
                    || p.seccomp.as_deref() == Some("deny-userns")
                    || p.has_nesting_or_hardening()
                {
                    self.err("profile-backend", sp, format!("profile `{}` uses settings only the host backend has", p.name))
                        .help("a docker profile uses seccomp (default/unconfined/file.json), cap-add, cap-drop, no-new-privileges, privileged, systempaths-unconfined, security-opt");
                }
            }
            BackendKind::Qemu => {
                // A guest's agent applies the process-level restrictions a host profile has;
                // container settings have no meaning there.
                if container_only(p) {
                    self.err("profile-backend", sp, format!("profile `{}` uses settings only a docker environment has", p.name))
                        .help("a qemu profile may set the host's process-level settings: seccomp = \"deny-userns\", no-new-privileges, bounding-set, userns-limit, outer-sandbox, userns-depth, protect-kernel-tunables, protect-proc, proc-subset");
                }
            }
        }
    }

    pub(super) fn subject(&mut self, s: &Spanned<RawSubject>) -> Vec<Subject> {
        let r = s.get_ref();
        let name = r.name.get_ref().clone();
        let kind = r.kind.get_ref().as_str();
        let allowed = match kind {
            "bwrap" => BWRAP_AXES,
            "codex" => CODEX_AXES,
            "image-codex" => IMAGE_CODEX_AXES,
            other => {
                self.err(
                    "bad-value",
                    span(&r.kind),
                    format!("unknown subject kind `{other}`"),
                )
                .help("use bwrap, codex or image-codex");
                return Vec::new();
            }
        };
        let given: [(&'static str, &Option<SValue>); 5] = [
            ("build", &r.build),
            ("setuid", &r.setuid),
            ("argv", &r.argv),
            ("version", &r.version),
            ("system-bwrap", &r.system_bwrap),
        ];
        let what = format!("a {kind} subject");
        let owner = format!("subject `{name}` ({kind})");
        let Some(axes) =
            self.collect_axes(&what, &owner, span(&r.name), &given, allowed, |k| match k {
                "build" => Some("system"),
                "setuid" => Some("as-is"),
                "argv" => Some("codex"),
                "system-bwrap" => Some("visible"),
                _ => None,
            })
        else {
            return Vec::new();
        };
        let combos = self.expand(&format!("subject `{name}`"), axes, &r.exclude, &r.include);
        if combos.is_empty() {
            self.err(
                "empty-product",
                span(s),
                format!("subject `{name}` expands to nothing"),
            );
        }
        let mut out = Vec::new();
        for c in combos {
            let val = |k: &str| c.get(k).map(|v| v.0.clone()).unwrap_or_default();
            let sp = |k: &str| c.get(k).and_then(|v| v.1.clone());
            let (id, spec) = if kind == "bwrap" {
                let build = val("build");
                if build != "system" && !build.starts_with('/') {
                    self.err(
                        "bad-axis-value",
                        sp("build"),
                        format!("build `{build}` is neither `system` nor an absolute path"),
                    );
                }
                let setuid = match val("setuid").as_str() {
                    "true" => SetuidMode::Force,
                    "false" => SetuidMode::Never,
                    "as-is" => SetuidMode::AsIs,
                    other => {
                        self.err(
                            "bad-axis-value",
                            sp("setuid"),
                            format!("setuid `{other}` is not true, false or \"as-is\""),
                        );
                        SetuidMode::AsIs
                    }
                };
                let argv = match val("argv").as_str() {
                    "codex" => ArgvProfile::Codex,
                    "codex-legacy" => ArgvProfile::CodexLegacy,
                    other => {
                        self.err(
                            "bad-axis-value",
                            sp("argv"),
                            format!("argv profile `{other}` is unknown"),
                        )
                        .help("use codex or codex-legacy");
                        ArgvProfile::Codex
                    }
                };
                let build_label = if build == "system" {
                    build.clone()
                } else {
                    sanitize(&build)
                };
                let suid = match setuid {
                    SetuidMode::Force => "+setuid",
                    SetuidMode::Never => "",
                    SetuidMode::AsIs => "+as-is",
                };
                (
                    format!("{name}-{build_label}{suid}+{}", argv.as_str()),
                    SubjectSpec::Bwrap {
                        build,
                        setuid,
                        argv,
                    },
                )
            } else if kind == "image-codex" {
                (name.clone(), SubjectSpec::ImageCodex)
            } else {
                let version = val("version");
                let hide_system_bwrap = match val("system-bwrap").as_str() {
                    "visible" => false,
                    "hidden" => true,
                    other => {
                        self.err(
                            "bad-axis-value",
                            sp("system-bwrap"),
                            format!("system-bwrap `{other}` is not \"visible\" or \"hidden\""),
                        );
                        false
                    }
                };
                (
                    if hide_system_bwrap {
                        format!("{name}-{version}+no-system-bwrap")
                    } else {
                        format!("{name}-{version}")
                    },
                    SubjectSpec::Codex {
                        version,
                        codex_bin: PathBuf::new(),
                        hide_system_bwrap,
                        entry: None,
                    },
                )
            };
            let mut axes: BTreeMap<String, String> =
                c.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
            axes.insert("subject".into(), name.clone());
            axes.insert("kind".into(), kind.into());
            out.push(Subject {
                id,
                name: name.clone(),
                axes,
                spec,
            });
        }
        out
    }

    /// The axes an entry gives, checked against the ones its backend or kind has, with the
    /// defaults of those it leaves out; `None` when something is missing or not allowed (the
    /// problems are recorded).
    fn collect_axes(
        &mut self,
        what: &str,
        owner: &str,
        at: Option<Range<usize>>,
        given: &[(&'static str, &Option<SValue>)],
        allowed: &[&'static str],
        default: impl Fn(&str) -> Option<&'static str>,
    ) -> Option<Vec<(&'static str, Values)>> {
        let mut axes = Vec::new();
        let mut ok = true;
        for &(k, v) in given {
            match (v, allowed.contains(&k)) {
                (Some(v), false) => {
                    ok = false;
                    self.err("unknown-axis", span(v), format!("{what} has no axis `{k}`"))
                        .help(format!("its axes are: {}", allowed.join(", ")));
                }
                (Some(v), true) => {
                    let vals = self.values(k, v);
                    axes.push((k, vals));
                }
                (None, true) => match default(k) {
                    Some(d) => axes.push((k, vec![(d.to_string(), None)])),
                    None => {
                        ok = false;
                        self.err("missing-axis", at.clone(), format!("{owner} needs `{k}`"));
                    }
                },
                (None, false) => {}
            }
        }
        (ok && axes.len() == allowed.len()).then_some(axes)
    }
}
