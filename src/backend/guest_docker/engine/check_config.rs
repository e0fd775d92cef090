//! Moby's `contrib/check-config.sh` run against a cached kernel's config, its output kept as
//! `check-config.txt` next to the kernel (shown by `nsmatrix kernels list --verbose`).
//!
//! The script reads the kernel version from `uname -r`; it is run with a `uname` on PATH that
//! answers the checked kernel's release, so its version-dependent checks are about that kernel.
//! Its first lines (cgroup hierarchy, AppArmor) describe the machine it runs on, not the kernel.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow};

use crate::artifacts::kernels::Kernel;

/// Where distributions ship the script (Debian's docker.io), unless `$NSMATRIX_CHECK_CONFIG`.
const SCRIPT_PATHS: &[&str] = &[
    "/usr/share/docker.io/contrib/check-config.sh",
    "/usr/share/docker/contrib/check-config.sh",
];

pub fn script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NSMATRIX_CHECK_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    SCRIPT_PATHS.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The kept output for `kernel`, produced now if it is not there yet.
pub fn ensure(kernel: &Kernel) -> Result<String> {
    let out = kernel.dir.join("check-config.txt");
    if let Ok(t) = fs::read_to_string(&out) {
        return Ok(t);
    }
    let script = script().ok_or_else(|| {
        anyhow!("Moby's check-config.sh is not installed (fix: apt-get install docker.io, or set NSMATRIX_CHECK_CONFIG)")
    })?;
    let text = run(&script, &kernel.dir.join("config"), &kernel.facts.release)?;
    fs::write(&out, &text)?;
    Ok(text)
}

fn run(script: &Path, config: &Path, release: &str) -> Result<String> {
    let bin = std::env::temp_dir().join(format!("nsmatrix-uname-{}", std::process::id()));
    fs::create_dir_all(&bin)?;
    let uname = bin.join("uname");
    fs::write(&uname, format!("#!/bin/sh\necho '{release}'\n"))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&uname, fs::Permissions::from_mode(0o755))?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("bash")
        .arg(script)
        .arg(config)
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to run {}", script.display()));
    fs::remove_dir_all(&bin).ok();
    let o = o?;
    let mut text = strip_ansi(&String::from_utf8_lossy(&o.stdout));
    let err = strip_ansi(&String::from_utf8_lossy(&o.stderr));
    if !err.trim().is_empty() {
        text.push_str(&err);
    }
    Ok(text)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `missing` options of the "Generally Necessary" section, from the kept output.
pub fn necessary_missing(text: &str) -> (usize, Vec<String>) {
    let mut in_section = false;
    let (mut total, mut missing) = (0, Vec::new());
    for line in text.lines() {
        if line.starts_with("Generally Necessary") {
            in_section = true;
            continue;
        }
        if line.starts_with("Optional Features") {
            break;
        }
        if in_section && let Some(rest) = line.trim_start().strip_prefix("- CONFIG_") {
            total += 1;
            if let Some((name, state)) = rest.split_once(':')
                && state.trim() == "missing"
            {
                missing.push(format!("CONFIG_{name}"));
            }
        }
    }
    (total, missing)
}

/// The `--verbose` part of `nsmatrix kernels list`: each cached kernel's check-config output.
pub fn print_verbose(rows: &[crate::artifacts::kernels::KernelStatus]) {
    for r in rows {
        let Some(k) = &r.cached else { continue };
        println!(
            "\n== {}: Moby's check-config.sh against its config ==",
            r.spec.name
        );
        match ensure(k) {
            Ok(text) => {
                let (n, missing) = necessary_missing(&text);
                println!(
                    "generally necessary: {} of {n} enabled{}",
                    n - missing.len(),
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!("; missing: {}", missing.join(", "))
                    }
                );
                for line in text.lines() {
                    println!("  {line}");
                }
            }
            Err(e) => println!("  (not checked: {e:#})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[37mCONFIG_X\u{1b}[m: \u{1b}[1;31mmissing\u{1b}[m"),
            "CONFIG_X: missing"
        );
    }

    #[test]
    fn necessary_section_is_counted() {
        let t = "info\nGenerally Necessary:\n- cgroup hierarchy: cgroupv2\n- CONFIG_NAMESPACES: enabled\n- CONFIG_VETH: missing\n  - CONFIG_X: enabled (as module)\nOptional Features:\n- CONFIG_USER_NS: missing\n";
        let (n, m) = necessary_missing(t);
        assert_eq!(n, 3);
        assert_eq!(m, vec!["CONFIG_VETH".to_string()]);
    }
}
