//! Which accelerator really works here. [`test_boot`] boots a 512-byte boot sector that writes
//! to the serial port and exits QEMU through `isa-debug-exit` (does QEMU work at all?).
//! [`probe_accel`] boots a real cached kernel under KVM with the CPU model batches use: a boot
//! sector alone is not enough — on some hosts it passes while a Linux guest hangs in early boot
//! (measured: KVM with the default CPU prints nothing for 25 s; `-cpu host` aborts on an MSR).
//! KVM is used only if the kernel reaches its "no init" panic within a short timeout; the
//! answer is cached per host, kernel release and QEMU binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::launcher::Accel;
use crate::artifacts::cache::cache_dir;

/// `isa-debug-exit` turns the byte written to its port into exit status `(v << 1) | 1`.
const PROBE_EXIT: i32 = (0x10 << 1) | 1;
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// mov al,'K'; mov dx,0x3f8; out dx,al; mov al,0x10; out 0xf4,al; hlt; jmp $-1
fn boot_sector() -> Vec<u8> {
    let code = [
        0xB0, b'K', 0xBA, 0xF8, 0x03, 0xEE, 0xB0, 0x10, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD,
    ];
    let mut s = vec![0u8; 512];
    s[..code.len()].copy_from_slice(&code);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProbeRecord {
    accel: Accel,
    note: String,
}

/// The cached answer, else a fresh probe with `kernel` (any bootable bzImage); without a kernel
/// the answer is TCG and is not cached. `$NSMATRIX_QEMU_ACCEL=kvm|tcg` overrides both.
pub(crate) async fn probe_accel(qemu: &Path, kernel: Option<&Path>) -> (Accel, String) {
    match std::env::var("NSMATRIX_QEMU_ACCEL").as_deref() {
        Ok("tcg") => return (Accel::Tcg, "tcg (NSMATRIX_QEMU_ACCEL)".into()),
        Ok("kvm") => return (Accel::Kvm, "kvm (NSMATRIX_QEMU_ACCEL)".into()),
        _ => {}
    }
    if !Path::new("/dev/kvm").exists() {
        return (Accel::Tcg, "tcg: no /dev/kvm".to_string());
    }
    let cache = cache_file(qemu);
    if let Some(r) = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<ProbeRecord>(&b).ok())
    {
        return (r.accel, format!("{} (cached)", r.note));
    }
    let Some(kernel) = kernel else {
        return (
            Accel::Tcg,
            "tcg: KVM not probed yet (no kernel cached to probe with)".to_string(),
        );
    };
    let (accel, note) = match kernel_boot(qemu, kernel, Accel::Kvm).await {
        Ok(d) => (
            Accel::Kvm,
            format!("kvm: test boot of a kernel in {} ms", d.as_millis()),
        ),
        Err(e) => (Accel::Tcg, format!("tcg: a KVM test boot failed: {e}")),
    };
    if let Some(parent) = cache.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let rec = ProbeRecord {
        accel,
        note: note.clone(),
    };
    let _ = std::fs::write(&cache, serde_json::to_vec(&rec).unwrap_or_default());
    (accel, note)
}

/// Boot `kernel` without an initramfs: it must print its banner and panic for want of an init
/// (`panic=-1 -no-reboot` then exits QEMU) within [`PROBE_TIMEOUT`].
pub(crate) async fn kernel_boot(
    qemu: &Path,
    kernel: &Path,
    accel: Accel,
) -> Result<Duration, String> {
    let dir = tempfile_dir().map_err(|e| e.to_string())?;
    let console = dir.join("console.log");
    let start = std::time::Instant::now();
    let spawned = tokio::process::Command::new(qemu)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-m",
            "256",
        ])
        .args([
            "-accel",
            accel.as_str(),
            "-cpu",
            super::launcher::cpu_model(accel),
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=8"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Err(format!("failed to start {}: {e}", qemu.display())),
    };
    let waited = tokio::time::timeout(PROBE_TIMEOUT, child.wait()).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let first_err = err
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or("")
        .to_string();
    match waited {
        Ok(_) if log.contains("Linux version") => Ok(start.elapsed()),
        Ok(Ok(status)) => Err(format!(
            "qemu exited with {status} before the kernel spoke {first_err}"
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the kernel did not get to its panic within {PROBE_TIMEOUT:?} (hung) {first_err}"
        )),
    }
}

/// Boot the probe sector with `accel`; Ok(time) if it reached the exit port in time.
pub(crate) async fn test_boot(qemu: &Path, accel: Accel) -> Result<Duration, String> {
    let dir = tempfile_dir().map_err(|e| e.to_string())?;
    let img = dir.join("probe.img");
    std::fs::write(&img, boot_sector()).map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            accel.as_str(),
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-drive")
        .arg(format!("format=raw,if=ide,file={}", img.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("failed to start {}: {e}", qemu.display()))?;
    let result = match tokio::time::timeout(PROBE_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.code() == Some(PROBE_EXIT) => Ok(start.elapsed()),
        Ok(Ok(status)) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            Err(format!("exited with {status}: {}", err.trim()))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no exit within {PROBE_TIMEOUT:?} (hung)")),
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("nsmatrix-accel-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn cache_file(qemu: &Path) -> PathBuf {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu_id = std::fs::metadata(qemu)
        .map(|m| format!("{}-{:?}", m.len(), m.modified().ok()))
        .unwrap_or_default();
    let key = format!(
        "{}|{}|{}|{}",
        host.trim(),
        release.trim(),
        qemu.display(),
        qemu_id
    );
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    cache_dir()
        .join("qemu")
        .join(format!("accel-{}.json", &h[..16]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_sector_is_bootable() {
        let s = super::boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }
}
