//! Security profiles as container settings: [`security_settings`] maps a matrix [`Profile`]
//! (plus the read-only axis) onto the security part of a container's HostConfig, as plain data.
//!
//! Pure: a custom seccomp file is named here and read only when the container is created.

use std::path::PathBuf;

use crate::matrix::model::Profile;

/// Which seccomp filter the container gets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Seccomp {
    /// The engine's default profile (denies unshare/clone of user namespaces without
    /// CAP_SYS_ADMIN).
    #[default]
    EngineDefault,
    Unconfined,
    /// A JSON profile on the host, inlined into `seccomp=<json>` at container creation.
    File(PathBuf),
}

/// The security settings of one container; everything else in its HostConfig is fixed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SecuritySettings {
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub seccomp: Seccomp,
    pub no_new_privileges: bool,
    /// No masked or read-only /proc and /sys paths (`systempaths=unconfined`).
    pub unmask_system_paths: bool,
    /// Further `security_opt` strings, passed through (apparmor=..., label=...).
    pub security_opt: Vec<String>,
    pub read_only_rootfs: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProfileError {
    #[error("profile {profile:?}: {setting} applies to the host backend only")]
    HostOnly {
        profile: String,
        setting: &'static str,
    },
    #[error(
        "profile {profile:?}: unknown seccomp value {value:?} (expected default, unconfined or a path to a JSON profile)"
    )]
    UnknownSeccomp { profile: String, value: String },
}

/// Map a profile (`None` = the engine's defaults) and the read-only axis onto container
/// settings. `security_opt` entries that Docker's CLI would translate (`seccomp=...`,
/// `no-new-privileges`, `systempaths=unconfined`) are folded into the typed fields.
pub(crate) fn security_settings(
    profile: Option<&Profile>,
    read_only: bool,
) -> Result<SecuritySettings, ProfileError> {
    let mut s = SecuritySettings {
        read_only_rootfs: read_only,
        ..Default::default()
    };
    let Some(p) = profile else { return Ok(s) };
    let host_only = |setting| ProfileError::HostOnly {
        profile: p.name.clone(),
        setting,
    };
    if p.bounding_set.is_some() {
        return Err(host_only("bounding-set"));
    }
    if p.userns_limit.is_some() {
        return Err(host_only("userns-limit"));
    }
    if p.has_nesting_or_hardening() {
        return Err(host_only(
            "outer-sandbox/userns-depth/protect-kernel-tunables/protect-proc/proc-subset",
        ));
    }
    s.privileged = p.privileged;
    s.no_new_privileges = p.no_new_privileges;
    s.unmask_system_paths = p.systempaths_unconfined;
    s.cap_add = p.cap_add.iter().map(|c| cap_name(c)).collect();
    s.cap_drop = p.cap_drop.iter().map(|c| cap_name(c)).collect();
    if let Some(v) = &p.seccomp {
        s.seccomp = parse_seccomp(&p.name, v)?;
    }
    for opt in &p.security_opt {
        let (key, value) = opt.split_once(['=', ':']).unwrap_or((opt.as_str(), ""));
        match key {
            "seccomp" => s.seccomp = parse_seccomp(&p.name, value)?,
            "no-new-privileges" => s.no_new_privileges = value.is_empty() || value == "true",
            "systempaths" if value == "unconfined" => s.unmask_system_paths = true,
            _ => s.security_opt.push(opt.clone()),
        }
    }
    Ok(s)
}

fn parse_seccomp(profile: &str, value: &str) -> Result<Seccomp, ProfileError> {
    match value {
        "" | "default" => Ok(Seccomp::EngineDefault),
        // `none` is the host backend's word for "no filter".
        "unconfined" | "none" => Ok(Seccomp::Unconfined),
        "deny-userns" => Err(ProfileError::HostOnly {
            profile: profile.into(),
            setting: "seccomp = deny-userns",
        }),
        v if v.contains('/') || v.ends_with(".json") => Ok(Seccomp::File(PathBuf::from(v))),
        v => Err(ProfileError::UnknownSeccomp {
            profile: profile.into(),
            value: v.into(),
        }),
    }
}

/// `sys_admin`, `CAP_SYS_ADMIN` and `SYS_ADMIN` all mean `SYS_ADMIN` to the engine.
fn cap_name(c: &str) -> String {
    let up = c.trim().to_ascii_uppercase();
    up.strip_prefix("CAP_").map(str::to_string).unwrap_or(up)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(name: &str) -> Profile {
        crate::matrix::profiles(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml"),
        )
        .expect("matrix.toml loads")
        .into_iter()
        .find(|p| p.name == name)
        .unwrap()
    }

    #[test]
    fn builtin_profiles_map_as_documented() {
        let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        let base = SecuritySettings::default();
        let table: Vec<(&str, SecuritySettings)> = vec![
            ("default", base.clone()),
            // The host's `none` sets nothing a container would not have anyway.
            ("none", base.clone()),
            (
                "seccomp-unconfined",
                SecuritySettings {
                    seccomp: Seccomp::Unconfined,
                    ..base.clone()
                },
            ),
            (
                "holyclaude",
                SecuritySettings {
                    seccomp: Seccomp::Unconfined,
                    cap_add: s(&["SYS_ADMIN", "SYS_PTRACE"]),
                    ..base.clone()
                },
            ),
            (
                "holyclaude+net-admin",
                SecuritySettings {
                    seccomp: Seccomp::Unconfined,
                    cap_add: s(&["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"]),
                    ..base.clone()
                },
            ),
            (
                "holyclaude+apparmor-unconfined",
                SecuritySettings {
                    seccomp: Seccomp::Unconfined,
                    cap_add: s(&["SYS_ADMIN", "SYS_PTRACE"]),
                    security_opt: s(&["apparmor=unconfined"]),
                    ..base.clone()
                },
            ),
            (
                "no-new-privileges",
                SecuritySettings {
                    no_new_privileges: true,
                    ..base.clone()
                },
            ),
            (
                "privileged",
                SecuritySettings {
                    privileged: true,
                    ..base.clone()
                },
            ),
            (
                "systempaths-unconfined",
                SecuritySettings {
                    unmask_system_paths: true,
                    ..base.clone()
                },
            ),
        ];
        // Every profile of matrix.toml that a container can take is in the table.
        let all = crate::matrix::profiles(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml"),
        )
        .expect("matrix.toml loads");
        for p in &all {
            if security_settings(Some(p), false).is_ok() {
                assert!(
                    table.iter().any(|(n, _)| *n == p.name),
                    "{} untested",
                    p.name
                );
            }
        }
        for (name, want) in table {
            assert_eq!(
                security_settings(Some(&builtin(name)), false).unwrap(),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn no_profile_and_read_only() {
        let s = security_settings(None, true).unwrap();
        assert!(s.read_only_rootfs);
        assert_eq!(
            s,
            SecuritySettings {
                read_only_rootfs: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn seccomp_values() {
        let table: &[(&str, Result<Seccomp, &str>)] = &[
            ("default", Ok(Seccomp::EngineDefault)),
            ("unconfined", Ok(Seccomp::Unconfined)),
            ("none", Ok(Seccomp::Unconfined)),
            (
                "profiles/deny.json",
                Ok(Seccomp::File("profiles/deny.json".into())),
            ),
            ("/abs/x", Ok(Seccomp::File("/abs/x".into()))),
            ("deny-userns", Err("host backend only")),
            ("strict", Err("unknown seccomp value")),
        ];
        for (value, want) in table {
            let p = Profile {
                name: "p".into(),
                seccomp: Some(value.to_string()),
                ..Default::default()
            };
            match (security_settings(Some(&p), false), want) {
                (Ok(s), Ok(w)) => assert_eq!(&s.seccomp, w, "{value}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{value}: {e}"),
                (got, want) => panic!("{value}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn security_opt_strings_fold_into_fields() {
        let p = Profile {
            name: "p".into(),
            cap_add: vec!["cap_net_admin".into()],
            cap_drop: vec!["ALL".into()],
            security_opt: vec![
                "seccomp=unconfined".into(),
                "no-new-privileges:true".into(),
                "systempaths=unconfined".into(),
                "apparmor=unconfined".into(),
            ],
            ..Default::default()
        };
        let s = security_settings(Some(&p), false).unwrap();
        assert_eq!(s.seccomp, Seccomp::Unconfined);
        assert!(s.no_new_privileges && s.unmask_system_paths);
        assert_eq!(s.cap_add, ["NET_ADMIN"]);
        assert_eq!(s.cap_drop, ["ALL"]);
        assert_eq!(s.security_opt, ["apparmor=unconfined"]);
    }

    #[test]
    fn host_only_settings_are_rejected() {
        let p = Profile {
            name: "h".into(),
            userns_limit: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            security_settings(Some(&p), false),
            Err(ProfileError::HostOnly {
                setting: "userns-limit",
                ..
            })
        ));
        let p = Profile {
            name: "h".into(),
            bounding_set: Some(vec![]),
            ..Default::default()
        };
        assert!(security_settings(Some(&p), false).is_err());
    }
}
