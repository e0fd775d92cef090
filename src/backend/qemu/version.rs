//! QEMU's version, and what an old QEMU costs a guest under TCG.
//!
//! Measured in a debian-6.1 guest under TCG, 20 starts each from the guest's shell: `bwrap
//! --version` took 79 ms per start under QEMU 7.2 (Debian 12's) and 19 ms under QEMU 10.0. Under
//! 7.2 the difference is address-space randomisation, which puts a process's libraries at new
//! addresses on every exec: with it turned off (`norandmaps`, as an experiment) 7.2 took 17 ms.
//! Which change in QEMU made the difference was not traced, and versions between were not
//! measured. Results are the same either way; only the time differs,
//! so an old QEMU is a note with its fix, not an error.

use std::path::Path;

/// QEMUs before this one get the note (7.2 was measured; 10.0 was measured not to need it).
const NOTE_BEFORE: (u32, u32) = (8, 0);

/// The first line of `qemu --version` ("QEMU emulator version 10.0.2 (Debian ...)"), or why it
/// could not be read.
pub fn version_line(qemu: &Path) -> Result<String, String> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} fails to run: {e}", qemu.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("?")
        .to_string())
}

/// (major, minor) from a `--version` line.
pub fn parse(line: &str) -> Option<(u32, u32)> {
    let rest = line.split("version ").nth(1)?;
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = number.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// The notes a backend whose guests run on `qemu` (`--version` line `line`) under `accel`
/// gives: [`tcg_note`] under TCG, none under KVM.
pub(crate) fn notes(accel: super::Accel, qemu: &Path, line: &str) -> Vec<String> {
    match accel {
        super::Accel::Tcg => tcg_note(qemu, line).into_iter().collect(),
        super::Accel::Kvm => Vec::new(),
    }
}

/// The note a run prints when guests run under TCG on a QEMU older than 8: what it costs and
/// how to get a newer one. `None` for a newer QEMU or one whose version cannot be read.
pub(crate) fn tcg_note(qemu: &Path, line: &str) -> Option<String> {
    let (major, minor) = parse(line)?;
    if (major, minor) >= NOTE_BEFORE {
        return None;
    }
    Some(format!(
        "{} is QEMU {major}.{minor}: under TCG it starts bwrap in a guest about four times slower \
         than QEMU 10.0 does (79 ms against 19 ms per start, measured with 7.2), so guest cells \
         take longer; their results are the same. Fix: install a newer QEMU (Debian 12: \
         add bookworm-backports to apt's sources and `apt-get install -t bookworm-backports \
         qemu-system-x86`, as scripts/install-packages.sh does), or point NSMATRIX_QEMU at \
         one",
        qemu.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_qemus_own_lines() {
        assert_eq!(
            parse("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some((7, 2))
        );
        assert_eq!(
            parse("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some((10, 0))
        );
        assert_eq!(parse("QEMU emulator version 8.2.2"), Some((8, 2)));
        assert_eq!(parse("qemu-system-x86_64: unknown option"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn only_a_qemu_before_8_gets_the_note() {
        let q = Path::new("/usr/bin/qemu-system-x86_64");
        let old = tcg_note(q, "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)").unwrap();
        assert!(old.contains("QEMU 7.2"), "{old}");
        assert!(old.contains("bookworm-backports"), "{old}");
        assert!(old.contains("/usr/bin/qemu-system-x86_64"), "{old}");
        assert_eq!(tcg_note(q, "QEMU emulator version 8.0.0"), None);
        assert_eq!(tcg_note(q, "QEMU emulator version 10.0.2 (Debian)"), None);
        assert_eq!(tcg_note(q, "garbage"), None);
    }
}
