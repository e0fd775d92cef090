//! The batch's AppArmor policy, loaded in a QEMU guest before any cell runs: AppArmor must be
//! enabled in the guest's kernel and have every feature the sets require; the profiles are
//! compiled and loaded by the suite's own `apparmor_parser`.

use std::fs;
use std::path::Path;

use crate::protocol::AppArmorPolicy;

const SECURITYFS: &str = "/sys/kernel/security";
const APPARMOR_FS: &str = "/sys/kernel/security/apparmor";
const ENABLED: &str = "/sys/module/apparmor/parameters/enabled";
/// Where the profiles are written for the parser.
const POLICY_DIR: &str = "/etc/apparmor.d/nsmatrix";
const PARSER: &str = "/usr/sbin/apparmor_parser";

/// Why the batch's cells cannot run under the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refused {
    /// The kernel cannot apply it (no AppArmor, a missing feature): the cells SKIP.
    Skip(String),
    /// Loading failed (the parser's message): the cells ERROR.
    Error(String),
}

/// nsmatrix's own profile (loaded beside every set) that only denies one capability, audited:
/// see [`reset_audit_cache`]. Its lines are not a cell's evidence ([`RESET_PROFILE`] is
/// filtered out of the kernel log).
pub(crate) const RESET_PROFILE: &str = "nsmatrix-audit-reset";
const RESET_POLICY: &str = "abi <abi/4.0>,\nprofile nsmatrix-audit-reset {\n  /{,**} rmix,\n  audit deny capability setuid,\n}\n";

/// Make the next capability denial be logged. AppArmor logs a denied capability once per
/// profile and CPU and stays quiet about it until a denial under another profile happens on
/// that CPU (its duplicate elimination; replacing a profile by an identical one changes
/// nothing), so only a guest's first cell would carry its audit line. Before each cell a
/// child of the agent moves into [`RESET_PROFILE`] and is denied `setuid`, which resets it.
pub(super) fn reset_audit_cache() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let attr = if Path::new("/proc/self/attr/apparmor/current").exists() {
        "/proc/self/attr/apparmor/current"
    } else {
        "/proc/self/attr/current"
    };
    let request = std::ffi::CString::new(format!("changeprofile {RESET_PROFILE}"))
        .expect("no NUL in a profile name");
    let attr_c = std::ffi::CString::new(attr).expect("no NUL in a path");
    let mut cmd = std::process::Command::new("/bin/true");
    // SAFETY: only async-signal-safe calls (open, write, close, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(attr_c.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, request.as_ptr().cast(), request.as_bytes().len());
            libc::close(fd);
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Denied by the profile (audited): that denial is the reset.
            libc::setuid(0);
            Ok(())
        });
    }
    let status = cmd
        .status()
        .map_err(|e| format!("failed to reset AppArmor's audit cache: {e}"))?;
    if !status.success() {
        return Err(format!(
            "failed to reset AppArmor's audit cache: the child exited {status}"
        ));
    }
    Ok(())
}

/// What `features/<dir>` has, for a SKIP's reason.
fn listing(dir: &Path) -> String {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut names: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            format!("{} has: {}", dir.display(), names.join(" "))
        }
        Err(_) => format!("{} does not exist", dir.display()),
    }
}

/// The ABI a profile names (`abi <abi/4.0>,` → `abi/4.0`).
fn abi_of(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("abi <"))
        .and_then(|r| r.split_once('>'))
        .map(|(abi, _)| abi)
}

/// Load `policy`; returns the profiles the kernel then has (`name (mode)` lines).
pub(super) fn load(policy: &AppArmorPolicy) -> Result<String, Refused> {
    let enabled = fs::read_to_string(ENABLED).map(|s| s.trim().to_string());
    match enabled.as_deref() {
        Ok("Y") => {}
        Ok(other) => {
            return Err(Refused::Skip(format!(
                "AppArmor is not enabled in this kernel ({ENABLED}: {other}), so the policy set {} cannot be loaded",
                policy.sets
            )));
        }
        Err(_) => {
            return Err(Refused::Skip(format!(
                "this kernel has no AppArmor ({ENABLED} is missing), so the policy set {} cannot be loaded",
                policy.sets
            )));
        }
    }
    if !Path::new(APPARMOR_FS).exists() {
        super::init::mount(Some("securityfs"), SECURITYFS, Some("securityfs"), 0, None)
            .map_err(|e| Refused::Error(format!("failed to mount securityfs: {e:#}")))?;
    }
    for feature in &policy.requires {
        // `path` (the file must exist) or `path word` (it must also name the word).
        let (path, word) = match feature.split_once(' ') {
            Some((p, w)) => (p, Some(w.trim())),
            None => (feature.as_str(), None),
        };
        let p = Path::new(APPARMOR_FS).join("features").join(path);
        let has = match (fs::read_to_string(&p), word) {
            (Ok(text), Some(w)) => text.split_whitespace().any(|x| x == w),
            (Ok(_), None) => true,
            // A directory feature.
            (Err(_), None) => p.is_dir(),
            (Err(_), Some(_)) => false,
        };
        if !has {
            let seen = match fs::read_to_string(&p) {
                Ok(text) => format!("{} says: {}", p.display(), text.trim()),
                Err(_) => listing(p.parent().unwrap_or(Path::new(APPARMOR_FS))),
            };
            return Err(Refused::Skip(format!(
                "this kernel's AppArmor lacks the feature `{feature}`, which the policy set {} depends on{} ({seen})",
                policy.sets,
                if feature.contains("userns") {
                    ": it does not mediate user namespace creation"
                } else {
                    ""
                },
            )));
        }
    }
    // A profile written for a newer AppArmor ABI than the guest suite's parser ships (4.0,
    // with `userns`, came with apparmor 4; bookworm has 3.0) cannot be compiled here.
    for p in &policy.profiles {
        if let Some(abi) = abi_of(&p.text)
            && !Path::new("/etc/apparmor.d").join(abi).exists()
        {
            return Err(Refused::Skip(format!(
                "the guest suite's apparmor_parser has no {abi} (its ABIs: {}), which {} is written for: this suite's AppArmor tools are too old for the policy set {}",
                listing(Path::new("/etc/apparmor.d/abi")),
                p.name,
                policy.sets
            )));
        }
    }
    fs::create_dir_all(POLICY_DIR)
        .map_err(|e| Refused::Error(format!("failed to create {POLICY_DIR}: {e}")))?;
    let reset = crate::protocol::PolicyFile {
        name: format!("nsmatrix/{RESET_PROFILE}"),
        text: RESET_POLICY.to_string(),
    };
    for p in policy.profiles.iter().chain(std::iter::once(&reset)) {
        let file = Path::new(POLICY_DIR).join(p.name.replace('/', "."));
        fs::write(&file, &p.text)
            .map_err(|e| Refused::Error(format!("failed to write {}: {e}", file.display())))?;
        let out = std::process::Command::new(PARSER)
            .args(["--replace", "--base", "/etc/apparmor.d"])
            .arg(&file)
            .output()
            .map_err(|e| Refused::Error(format!("failed to run {PARSER}: {e}")))?;
        if !out.status.success() {
            return Err(Refused::Error(format!(
                "apparmor_parser refused {} ({}): {}",
                p.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    let loaded = fs::read_to_string(Path::new(APPARMOR_FS).join("profiles"))
        .map_err(|e| Refused::Error(format!("failed to read the loaded profiles: {e}")))?;
    Ok(loaded.lines().collect::<Vec<_>>().join("; "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_abi_a_profile_names() {
        assert_eq!(
            super::abi_of("# c\nabi <abi/4.0>,\nprofile x {}\n"),
            Some("abi/4.0")
        );
        assert_eq!(super::abi_of("profile x {}\n"), None);
    }
}
