//! The bwrap argv profiles: the one place that knows how Codex invokes bubblewrap.

use std::ffi::OsString;
use std::path::Path;

use crate::protocol::ArgvProfile;

/// What the bwrap build in use supports (probed from its `--help`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BwrapFeatures {
    /// `--argv0` exists from bubblewrap 0.9.0 on; Codex falls back to running without it.
    pub argv0: bool,
}

impl BwrapFeatures {
    pub fn from_help(help: &str) -> Self {
        BwrapFeatures {
            argv0: help.contains("--argv0"),
        }
    }
}

/// The argv after `bwrap` for running `command` with `workspace` as the only writable root,
/// the way Codex's workspace-write policy does (`--ro-bind / /`, `--dev /dev`, `--bind W W`, the
/// workspace's `.git` and `.codex` read-only again).
pub fn build(
    profile: ArgvProfile,
    features: BwrapFeatures,
    workspace: &Path,
    command: &[OsString],
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::with_capacity(32 + command.len());
    let mut push = |s: &str| a.push(OsString::from(s));
    push("--new-session");
    push("--die-with-parent");
    push("--ro-bind");
    push("/");
    push("/");
    match profile {
        ArgvProfile::Codex => {
            push("--dev");
            push("/dev");
        }
        ArgvProfile::CodexLegacy => {
            push("--dev-bind");
            push("/dev/null");
            push("/dev/null");
        }
    }
    let ws = workspace.as_os_str().to_os_string();
    a.extend([OsString::from("--bind"), ws.clone(), ws.clone()]);
    // Codex keeps the repository's metadata read-only inside a writable root.
    for sub in [".git", ".codex"] {
        let p = workspace.join(sub);
        if p.exists() {
            a.extend([OsString::from("--ro-bind"), p.clone().into(), p.into()]);
        }
    }
    if profile == ArgvProfile::Codex {
        a.push("--unshare-user".into());
    }
    a.push("--unshare-pid".into());
    a.push("--unshare-net".into());
    a.extend(["--proc".into(), "/proc".into()]);
    a.extend([OsString::from("--chdir"), ws]);
    if features.argv0 {
        a.extend(["--argv0".into(), "apply_patch".into()]);
    }
    a.push("--".into());
    a.extend(command.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[OsString]) -> String {
        v.iter()
            .map(|x| x.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn profiles() {
        let cmd = [OsString::from("/x/apply_patch"), OsString::from("PATCH")];
        let ws = Path::new("/nonexistent-ws");
        assert_eq!(
            s(&build(
                ArgvProfile::Codex,
                BwrapFeatures { argv0: true },
                ws,
                &cmd
            )),
            "--new-session --die-with-parent --ro-bind / / --dev /dev --bind /nonexistent-ws \
             /nonexistent-ws --unshare-user --unshare-pid --unshare-net --proc /proc --chdir \
             /nonexistent-ws --argv0 apply_patch -- /x/apply_patch PATCH"
        );
        assert_eq!(
            s(&build(
                ArgvProfile::CodexLegacy,
                BwrapFeatures::default(),
                ws,
                &cmd
            )),
            "--new-session --die-with-parent --ro-bind / / --dev-bind /dev/null /dev/null --bind \
             /nonexistent-ws /nonexistent-ws --unshare-pid --unshare-net --proc /proc --chdir \
             /nonexistent-ws -- /x/apply_patch PATCH"
        );
    }

    #[test]
    fn git_dir_is_read_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(".git")).unwrap();
        let argv = s(&build(
            ArgvProfile::Codex,
            BwrapFeatures::default(),
            d.path(),
            &[],
        ));
        let g = d.path().join(".git");
        assert!(argv.contains(&format!("--ro-bind {} {}", g.display(), g.display())));
    }

    #[test]
    fn features_from_help() {
        assert!(BwrapFeatures::from_help("  --argv0 VALUE   Set argv[0]").argv0);
        assert!(!BwrapFeatures::from_help("  --unshare-user").argv0);
    }
}
