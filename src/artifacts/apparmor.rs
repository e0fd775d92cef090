//! The AppArmor policy sets a QEMU guest can load (`apparmor` axis of a qemu environment):
//! profiles in AppArmor's own syntax under `vm-images/apparmor/<set>/`, built into the binary.

use crate::protocol::{AppArmorPolicy, PolicyFile};

/// The set that loads nothing.
pub const NONE: &str = "none";

/// Joins the sets of one value: `ubuntu-like+bwrap-userns-restrict` loads both.
pub const JOIN: char = '+';

/// (set, files): every file is a profile to load, except `requires` (AppArmor features,
/// relative to `/sys/kernel/security/apparmor/features/`, the set depends on).
static SETS: &[(&str, &[(&str, &str)])] = &[
    (
        "ubuntu-like",
        &[(
            "bwrap",
            include_str!("../../vm-images/apparmor/ubuntu-like/bwrap"),
        )],
    ),
    (
        "bwrap-userns-restrict",
        &[(
            "bwrap",
            include_str!("../../vm-images/apparmor/bwrap-userns-restrict/bwrap"),
        )],
    ),
    (
        "confined-no-userns",
        &[
            (
                "bwrap",
                include_str!("../../vm-images/apparmor/confined-no-userns/bwrap"),
            ),
            (
                "requires",
                include_str!("../../vm-images/apparmor/confined-no-userns/requires"),
            ),
        ],
    ),
];

/// Every set's name, `none` first.
pub fn names() -> Vec<&'static str> {
    std::iter::once(NONE)
        .chain(SETS.iter().map(|(n, _)| *n))
        .collect()
}

/// The sets a value names (`a+b`), or the first unknown name.
pub fn parse(value: &str) -> Result<Vec<&'static str>, String> {
    if value == NONE {
        return Ok(Vec::new());
    }
    value
        .split(JOIN)
        .map(|part| {
            SETS.iter()
                .find(|(n, _)| *n == part)
                .map(|(n, _)| *n)
                .ok_or_else(|| part.to_string())
        })
        .collect()
}

/// The policy an axis value loads; `None` for `none`. Unknown names are checked at load.
pub fn policy(value: &str) -> Option<AppArmorPolicy> {
    let sets = parse(value).ok()?;
    if sets.is_empty() {
        return None;
    }
    let mut p = AppArmorPolicy {
        sets: value.to_string(),
        profiles: Vec::new(),
        requires: Vec::new(),
    };
    for set in sets {
        let files = SETS
            .iter()
            .find(|(n, _)| *n == set)
            .map(|(_, f)| *f)
            .unwrap_or_default();
        for (name, text) in files {
            if *name == "requires" {
                for l in text.lines().map(str::trim) {
                    if !l.is_empty() && !l.starts_with('#') && !p.requires.iter().any(|r| r == l) {
                        p.requires.push(l.to_string());
                    }
                }
            } else {
                p.profiles.push(PolicyFile {
                    name: format!("{set}/{name}"),
                    text: (*text).to_string(),
                });
            }
        }
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_join_and_unknown_names_are_named() {
        assert_eq!(parse("none").unwrap(), Vec::<&str>::new());
        assert_eq!(
            parse("ubuntu-like+bwrap-userns-restrict").unwrap(),
            vec!["ubuntu-like", "bwrap-userns-restrict"]
        );
        assert_eq!(parse("ubuntu-like+bogus").unwrap_err(), "bogus");
        assert!(policy("none").is_none());
        let p = policy("confined-no-userns").unwrap();
        assert_eq!(p.requires, vec!["namespaces/mask userns_create"]);
        assert_eq!(p.profiles.len(), 1);
        assert!(!p.profiles[0].text.contains("\n  userns,"));
        let both = policy("ubuntu-like+bwrap-userns-restrict").unwrap();
        assert_eq!(both.profiles.len(), 2);
        assert!(both.requires.is_empty());
    }

    /// Every profile attaches to each path a subject's bwrap runs from in a guest.
    #[test]
    fn profiles_name_the_guest_paths_of_bwrap() {
        let work = crate::backend::qemu::GUEST_WORK_DIR;
        for set in ["ubuntu-like", "confined-no-userns"] {
            let p = policy(set).unwrap();
            let t = &p.profiles[0].text;
            assert!(t.contains("/usr/bin/bwrap"), "{set}");
            assert!(t.contains(&format!("{work}/subjects/*/bwrap")), "{set}");
            assert!(
                t.contains(&format!(
                    "{}/*/codex-resources/bwrap",
                    crate::agent::init::GUEST_CODEX_ROOT
                )),
                "{set}"
            );
        }
        let r = policy("bwrap-userns-restrict").unwrap();
        assert!(r.profiles[0].text.contains("profile bwrap /usr/bin/bwrap "));
        assert!(!r.profiles[0].text.contains("codex-resources"));
    }
}
