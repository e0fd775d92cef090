//! The agent as PID 1 of a QEMU guest: [`main`] mounts what a guest needs, loads the kernel's
//! modules, makes the root file system one that bwrap can `pivot_root` away from, runs the batch
//! baked into the initramfs with its events written to a dedicated virtio-serial port, and
//! powers the guest off. Diagnostics go to the console (kept by the host as the console log).
//!
//! Kernel command line (set by `backend::qemu`): `nsmatrix.mode=batch` (default) or
//! `nsmatrix.mode=shell` (an interactive shell as the batch's uid on the console).

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::protocol::BatchSpec;

/// Where the launcher puts things in the initramfs (the guest's view).
pub(crate) const GUEST_BATCH: &str = "/nsmatrix/batch.json";
pub(crate) const GUEST_AGENT: &str = "/nsmatrix/nsmatrix";
pub(crate) const GUEST_MODULES_DIR: &str = "/nsmatrix/modules";
pub(crate) const GUEST_MODULES_LIST: &str = "/nsmatrix/modules/load";
/// The read-only disks to mount, one `SERIAL MOUNTPOINT` line each (absent: none).
pub(crate) const GUEST_DISKS: &str = "/nsmatrix/disks";
/// Modules to load before mounting them (a packaged kernel's virtio_blk and ext4), with `load`.
pub(crate) const GUEST_DISK_MODULES_DIR: &str = "/nsmatrix/disk-modules";
/// Codex packages are mounted at `<this>/<version>`.
pub(crate) const GUEST_CODEX_ROOT: &str = "/opt/codex";
/// The virtio-serial port name the results travel on.
pub(crate) const RESULTS_PORT: &str = "nsmatrix.results";
/// Printed on the console when the batch is about to run; the launcher times the boot by it.
pub(crate) const READY_MARK: &str = "nsmatrix-init: ready";
pub(crate) const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether this process should act as a guest's init: PID 1 and not inside a container (a
/// container's PID 1 has a `/.dockerenv` or a `container` variable; a guest has neither).
pub fn is_guest_init() -> bool {
    std::process::id() == 1
        && std::env::var_os("container").is_none()
        && !Path::new("/.dockerenv").exists()
        && (Path::new(GUEST_BATCH).exists()
            || Path::new(crate::protocol::engine::GUEST_ENGINE_SPEC).exists())
}

/// PID 1's entry point: never returns; the guest powers off at the end, also on error.
pub fn main() -> ! {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("nsmatrix-init: error: {e:#}");
            1
        }
    };
    eprintln!("nsmatrix-init: powering off (status {code})");
    power_off()
}

fn power_off() -> ! {
    // A kernel without ACPI (tinyconfig) only halts on RB_POWER_OFF and QEMU would stay up, so
    // restart instead: the launcher always passes `-no-reboot`, which turns a reset into exit.
    // SAFETY: plain syscalls; reboot(2) does not return on success.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn run() -> Result<()> {
    let t0 = Instant::now();
    let kernel_boot = since_kernel_start();
    // SAFETY: setting the process environment before any other thread exists.
    unsafe {
        std::env::set_var("PATH", PATH);
        std::env::set_var("HOME", "/root");
    }
    pivotable_root().context("failed to make the root pivotable")?;
    mount_basics()?;
    let mounted = t0.elapsed();
    let loaded = load_modules(GUEST_MODULES_DIR, GUEST_MODULES_LIST)?;
    let modules = t0.elapsed() - mounted;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mode = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nsmatrix.mode="))
        .unwrap_or("batch")
        .to_string();
    if mode == "engine" {
        return super::engine::run(t0);
    }
    let spec: BatchSpec = serde_json::from_slice(
        &fs::read(GUEST_BATCH).with_context(|| format!("failed to read {GUEST_BATCH}"))?,
    )
    .context("failed to parse the batch spec")?;
    eprintln!(
        "nsmatrix-init: started {} ms after the kernel; root and file systems mounted in {} ms; {} modules loaded ({}) in {} ms; mode {mode}, {} cells, {} ms since init",
        kernel_boot.as_millis(),
        mounted.as_millis(),
        loaded.len(),
        loaded.join(", "),
        modules.as_millis(),
        spec.cells.len(),
        t0.elapsed().as_millis()
    );
    mount_disks().context("failed to mount the batch's disks")?;
    if mode == "shell" {
        return shell(&spec);
    }
    let mut port = open_port(RESULTS_PORT, Duration::from_secs(10))?;
    eprintln!("{READY_MARK} ({} ms since init)", t0.elapsed().as_millis());
    crate::agent::run_batch(&spec, &mut port).context("the batch failed")?;
    port.flush().ok();
    // Let the host drain the port before the guest disappears.
    // SAFETY: fsync on a valid fd.
    unsafe { libc::fsync(port.as_raw_fd()) };
    eprintln!(
        "nsmatrix-init: batch done {} ms since init",
        t0.elapsed().as_millis()
    );
    Ok(())
}

/// Time since the kernel started (CLOCK_BOOTTIME): at init's start, the kernel's own boot.
fn since_kernel_start() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The initramfs is `rootfs`, which has no parent mount, and `pivot_root(2)` refuses to move
/// away from it (EINVAL): bwrap could never run. So, like `switch_root`, bind the root onto a
/// directory, move that mount over `/` and chroot into it: the new root has a parent.
fn pivotable_root() -> Result<()> {
    let dir = "/nsmatrix/root";
    fs::create_dir_all(dir)?;
    mount(Some("/"), dir, None, libc::MS_BIND | libc::MS_REC, None)?;
    switch_root(dir)
}

/// Like switch_root: move the mount at `dir` over `/` and chroot into it (pivot_root then
/// works, since the root is a real mount with a parent).
pub(super) fn switch_root(dir: &str) -> Result<()> {
    std::env::set_current_dir(dir)?;
    mount(Some("."), "/", None, libc::MS_MOVE, None)?;
    let dot = CString::new(".").unwrap();
    // SAFETY: chroot with a valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        bail!("chroot: {}", std::io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;
    Ok(())
}

fn mount_basics() -> Result<()> {
    let nodev_nosuid = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC;
    for (src, target, fstype, flags, data) in [
        ("proc", "/proc", "proc", nodev_nosuid, None),
        ("sysfs", "/sys", "sysfs", nodev_nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        ),
    ] {
        fs::create_dir_all(target)?;
        if let Err(e) = mount(Some(src), target, Some(fstype), flags, data) {
            // devpts and friends are optional on a tiny kernel; proc, sys and dev are not.
            if ["/proc", "/sys", "/dev"].contains(&target) {
                return Err(e);
            }
            eprintln!("nsmatrix-init: {e:#}");
        }
    }
    for (link, to) in [("/dev/fd", "/proc/self/fd"), ("/dev/ptmx", "pts/ptmx")] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    Ok(())
}

pub(super) fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (src_c, target_c) = (src.map(c), c(target));
    let (fs_c, data_c) = (fstype.map(c), data.map(c));
    let ptr = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a valid C string or null, as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fs_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mount {} on {target}: {}",
            src.unwrap_or("-"),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Mount the read-only disks of [`GUEST_DISKS`] (the Codex packages), after loading the
/// modules that reading them needs.
fn mount_disks() -> Result<()> {
    let Ok(list) = fs::read_to_string(GUEST_DISKS) else {
        return Ok(());
    };
    let t = Instant::now();
    let loaded = load_modules(
        GUEST_DISK_MODULES_DIR,
        &format!("{GUEST_DISK_MODULES_DIR}/load"),
    )?;
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let (serial, at) = line
            .split_once(' ')
            .ok_or_else(|| anyhow!("{GUEST_DISKS}: bad line {line:?}"))?;
        let dev = super::engine::wait_disk(serial, Duration::from_secs(10))?;
        fs::create_dir_all(at)?;
        mount(
            Some(&dev),
            at,
            Some("ext4"),
            libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID,
            None,
        )?;
        eprintln!("nsmatrix-init: {dev} ({serial}) mounted read-only at {at}");
    }
    eprintln!(
        "nsmatrix-init: disks mounted in {} ms ({} modules loaded for them)",
        t.elapsed().as_millis(),
        loaded.len()
    );
    Ok(())
}

/// Load the modules listed (in dependency order) in `list`; a built-in one is not listed, one
/// already loaded is skipped.
fn load_modules(dir: &str, list: &str) -> Result<Vec<String>> {
    let Ok(list) = fs::read_to_string(list) else {
        return Ok(Vec::new());
    };
    let mut loaded = Vec::new();
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let t = Instant::now();
        let path = Path::new(dir).join(name);
        let f =
            fs::File::open(&path).with_context(|| format!("failed to open {}", path.display()))?;
        let params = CString::new("").unwrap();
        // SAFETY: finit_module(2) with an open fd and an empty parameter string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                bail!("failed to load module {name}: {err}");
            }
        }
        loaded.push(format!(
            "{} {} ms",
            name.trim_end_matches(".ko"),
            t.elapsed().as_millis()
        ));
    }
    Ok(loaded)
}

/// Open the virtio-serial port named `name` (waiting for the driver to probe it).
fn open_port(name: &str, wait: Duration) -> Result<fs::File> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(dev) = find_port(name) {
            return fs::OpenOptions::new()
                .write(true)
                .open(&dev)
                .with_context(|| format!("failed to open {}", dev.display()));
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "no virtio-serial port named {name} after {wait:?} (is virtio_console loaded?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn find_port(name: &str) -> Option<PathBuf> {
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            let dev = Path::new("/dev").join(e.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// Interactive repro: apply the batch's sysctls, then a login shell as the batch's uid on the
/// console, with a setuid copy of bwrap at /usr/local/bin/bwrap-setuid. Powers off on exit.
fn shell(spec: &BatchSpec) -> Result<()> {
    for (k, v) in &spec.sysctls {
        let p = Path::new("/proc/sys").join(k.replace('.', "/"));
        match fs::write(&p, v) {
            Ok(()) => eprintln!("nsmatrix-init: sysctl {k}={v}"),
            Err(e) => eprintln!("nsmatrix-init: sysctl {k}={v} not applied: {e}"),
        }
    }
    if let Some(p) = &spec.restrictions.apparmor {
        match super::lsm::load(p) {
            Ok(loaded) => eprintln!("nsmatrix-init: apparmor: loaded {}: {loaded}", p.sets),
            Err(e) => eprintln!("nsmatrix-init: apparmor: {} not loaded: {e:?}", p.sets),
        }
    }
    if let Ok(bwrap) = which("bwrap") {
        let dst = Path::new("/usr/local/bin/bwrap-setuid");
        fs::create_dir_all("/usr/local/bin")?;
        if fs::copy(&bwrap, dst).is_ok() {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dst, fs::Permissions::from_mode(0o4755))?;
        }
    }
    fs::create_dir_all(&spec.work_dir)?;
    std::os::unix::fs::chown(&spec.work_dir, Some(spec.uid), Some(spec.gid))?;
    eprintln!(
        "nsmatrix-init: shell as uid {} in {}; bwrap is {}; exit to power off",
        spec.uid,
        spec.work_dir.display(),
        which("bwrap")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "missing".into())
    );
    use std::os::unix::process::CommandExt;
    let (uid, gid) = (spec.uid, spec.gid);
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-l")
        .current_dir(&spec.work_dir)
        .env("HOME", &spec.work_dir)
        .env("PS1", "nsmatrix$ ");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 1);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = cmd.status().context("failed to start /bin/sh")?;
    eprintln!("nsmatrix-init: shell exited ({status})");
    Ok(())
}

fn which(name: &str) -> Result<PathBuf> {
    PATH.split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("{name} not found on {PATH}"))
}
