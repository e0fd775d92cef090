//! The kernel's log around each cell, in a QEMU guest: what the kernel said about the cell's
//! sandbox (AppArmor's audit lines, `VFS: Mount too revealing`, seccomp's audit lines) is
//! evidence for its record. The agent is the guest's only program, so the lines that appear
//! between a cell's start and its judgement are that cell's; when cells run side by side (a
//! guest with several vCPUs, no security policy loaded) they are also those of the cells beside
//! it, and the record says so. In a container of an engine guest the agent follows the guest
//! init's text copy of the log instead (the guest runs one container at a time).

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::Duration;

/// The guest's /dev/kmsg (None elsewhere: on a host or in a container the kernel's log is
/// not the cell's alone), the current cell's lines, and whether they have settled.
static LOG: Mutex<Option<Followed>> = Mutex::new(None);

struct Followed {
    file: fs::File,
    /// A text file of lines (an engine guest's relay), not /dev/kmsg's records.
    text: Option<String>,
    /// Every relevant line read so far; a cell's are those from its start on.
    read: Vec<String>,
    settle: Duration,
}

std::thread_local! {
    /// The cell this thread runs: where its lines start in [`Followed::read`], and whether
    /// its settle time has passed.
    static CELL: std::cell::Cell<Option<(usize, bool)>> = const { std::cell::Cell::new(None) };
}

/// How long the audit thread gets to print a cell's last lines (kauditd writes them after the
/// syscall that caused them has returned), once per cell: longer where a security module's
/// policy is loaded, whose lines are the evidence of the cell's signature.
const SETTLE_POLICY: Duration = Duration::from_millis(100);
const SETTLE_PLAIN: Duration = Duration::from_millis(20);

/// Start following the kernel's log (from its end). Also lifts the printk rate limit, which
/// would otherwise drop audit lines after ten in five seconds.
pub(super) fn open(policy_loaded: bool) -> std::io::Result<()> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")?;
    // SAFETY: lseek on a valid fd; SEEK_END on /dev/kmsg skips the records already there.
    unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    let _ = fs::write("/proc/sys/kernel/printk_ratelimit", "0");
    *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(Followed {
        file: f,
        text: None,
        read: Vec::new(),
        settle: if policy_loaded {
            SETTLE_POLICY
        } else {
            SETTLE_PLAIN
        },
    });
    Ok(())
}

/// Follow a text copy of the kernel's log from its current end (`confined`: the agent runs
/// under a security module's profile, whose lines are the evidence of the cell's signature).
pub(super) fn open_relay(path: &std::path::Path, confined: bool) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::End(0))?;
    *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(Followed {
        file: f,
        text: Some(String::new()),
        read: Vec::new(),
        settle: if confined {
            SETTLE_POLICY
        } else {
            SETTLE_PLAIN
        },
    });
    Ok(())
}

/// A new cell starts on this thread: what the log said before it is not its own.
pub(super) fn begin_cell() {
    let mut g = LOG.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = g.as_mut() {
        let new = drain(l).into_iter().filter(|x| relevant(x));
        l.read.extend(new);
        CELL.set(Some((l.read.len(), false)));
    }
}

/// The current cell's matching lines so far; `None` when the log is not followed. With
/// `settle`, the first such call of a cell waits [`Followed`]'s settle time for late lines (a
/// cell that passed without a policy loaded has nothing to wait for: a line that comes later
/// is dropped when the next cell begins, never given to it).
pub(super) fn lines(settle: bool) -> Option<Vec<String>> {
    let wait = LOG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()?
        .settle;
    let (start, settled) = CELL.get()?;
    if settle && !settled {
        // Not holding the lock: cells beside this one go on reading the log meanwhile.
        std::thread::sleep(wait);
        CELL.set(Some((start, true)));
    }
    let mut g = LOG.lock().unwrap_or_else(|e| e.into_inner());
    let l = g.as_mut()?;
    let new = drain(l).into_iter().filter(|x| relevant(x));
    l.read.extend(new);
    Some(l.read.get(start..).unwrap_or_default().to_vec())
}

/// Every record readable now, as its message text.
fn drain(l: &mut Followed) -> Vec<String> {
    if let Some(partial) = l.text.as_mut() {
        return drain_text(&mut l.file, partial);
    }
    let f = &mut l.file;
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

/// The whole lines appended to a text file since the last read (a partial last line waits).
fn drain_text(f: &mut fs::File, partial: &mut String) -> Vec<String> {
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    partial.push_str(&String::from_utf8_lossy(&bytes));
    let Some(end) = partial.rfind('\n') else {
        return Vec::new();
    };
    let done: String = partial.drain(..=end).collect();
    done.lines().map(|l| l.trim().to_string()).collect()
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
/// new proc/sysfs mount, seccomp's audit records (type 1326). AppArmor's lines about
/// nsmatrix's own reset profile are not: neither its denial (`profile=`) nor a move into it
/// that AppArmor refused (`name=`, `info="label not found"` where it is not loaded).
pub(crate) fn relevant(line: &str) -> bool {
    let reset = super::lsm::RESET_PROFILE;
    (line.contains("apparmor=")
        && !line.contains(&format!("profile=\"{reset}\""))
        && !line.contains(&format!("name=\"{reset}\"")))
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
            "audit: type=1400 audit(1796075829.045:15): apparmor=\"DENIED\" operation=\"change_profile\" info=\"label not found\" error=-2 profile=\"unconfined\" name=\"nsmatrix-audit-reset\" pid=269 comm=\"nsmatrix\""
        ));
        assert!(!relevant(
            "virtio_blk virtio1: [vda] 1024 512-byte logical blocks"
        ));
    }

    #[test]
    fn a_relayed_log_gives_whole_lines_and_keeps_a_partial_one_for_later() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kernel.log");
        let mut w = fs::File::create(&p).unwrap();
        let mut r = fs::File::open(&p).unwrap();
        let mut partial = String::new();
        write!(w, "audit: one\naudit: tw").unwrap();
        assert_eq!(drain_text(&mut r, &mut partial), ["audit: one"]);
        writeln!(w, "o").unwrap();
        assert_eq!(drain_text(&mut r, &mut partial), ["audit: two"]);
        assert!(drain_text(&mut r, &mut partial).is_empty());
    }
}
