//! The kernel's log around each cell, in a QEMU guest: what the kernel said about the cell's
//! sandbox (AppArmor's audit lines, `VFS: Mount too revealing`, seccomp's audit lines) is
//! evidence for its record. The agent is the guest's only program and runs one cell at a time,
//! so the lines that appear between a cell's start and its judgement are that cell's.

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::Duration;

/// The guest's /dev/kmsg (None elsewhere: on a host or in a container the kernel's log is
/// not the cell's alone) and the current cell's lines.
static LOG: Mutex<Option<(fs::File, Vec<String>)>> = Mutex::new(None);

/// How long the audit thread gets to print a cell's last lines (kauditd writes them after the
/// syscall that caused them has returned).
const SETTLE: Duration = Duration::from_millis(100);

/// Start following the kernel's log (from its end). Also lifts the printk rate limit, which
/// would otherwise drop audit lines after ten in five seconds.
pub(super) fn open() -> std::io::Result<()> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")?;
    // SAFETY: lseek on a valid fd; SEEK_END on /dev/kmsg skips the records already there.
    unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    let _ = fs::write("/proc/sys/kernel/printk_ratelimit", "0");
    *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some((f, Vec::new()));
    Ok(())
}

/// A new cell starts: what the log said before it is not its own.
pub(super) fn begin_cell() {
    let mut g = LOG.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((f, lines)) = g.as_mut() {
        drain(f);
        lines.clear();
    }
}

/// The current cell's matching lines so far (after a short settle). `None` when the log is
/// not followed.
pub(super) fn cell_lines() -> Option<Vec<String>> {
    let mut g = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let (f, lines) = g.as_mut()?;
    std::thread::sleep(SETTLE);
    lines.extend(drain(f).into_iter().filter(|l| relevant(l)));
    Some(lines.clone())
}

/// Every record readable now, as its message text.
fn drain(f: &mut fs::File) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push(message(&String::from_utf8_lossy(&buf[..n]))),
            // Overwritten records: the next read goes on with the oldest one left.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    out
}

/// A /dev/kmsg record (`6,1234,5678,-;text\n KEY=value...`) → its text.
fn message(record: &str) -> String {
    let first = record.lines().next().unwrap_or_default();
    first
        .split_once(';')
        .map_or(first, |(_, m)| m)
        .trim()
        .to_string()
}

/// The lines that say something about a sandbox: AppArmor's decisions, the kernel refusing a
/// new proc/sysfs mount, seccomp's audit records (type 1326).
pub(crate) fn relevant(line: &str) -> bool {
    (line.contains("apparmor=")
        && !line.contains(&format!("profile=\"{}\"", super::lsm::RESET_PROFILE)))
        || line.contains("Mount too revealing")
        || line.contains("type=1326")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_their_text_and_only_sandbox_lines_are_kept() {
        let r = "5,812,93112345,-;audit: type=1400 audit(1764518400.123:42): apparmor=\"DENIED\" operation=\"userns_create\" class=\"namespace\" info=\"Userns create restricted - failed to find unprivileged_userns profile\" profile=\"nsmatrix-bwrap-no-userns\" pid=312 comm=\"bwrap\" requested=\"userns_create\" denied=\"userns_create\"\n SUBSYSTEM=audit\n";
        let m = message(r);
        assert!(m.starts_with("audit: type=1400"), "{m}");
        assert!(!m.contains("SUBSYSTEM"));
        assert!(relevant(&m));
        assert!(relevant("VFS: Mount too revealing"));
        assert!(relevant(
            "audit: type=1326 audit(1.2:3): auid=4294967295 uid=1000 comm=\"bwrap\" syscall=272"
        ));
        assert!(!relevant(
            "audit: type=1400 audit(1.2:3): apparmor=\"DENIED\" operation=\"capable\" class=\"cap\" profile=\"nsmatrix-audit-reset\" pid=9 comm=\"true\" capability=7  capname=\"setuid\""
        ));
        assert!(!relevant(
            "virtio_blk virtio1: [vda] 1024 512-byte logical blocks"
        ));
    }
}
