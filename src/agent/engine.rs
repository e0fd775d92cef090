//! The guest's side of an engine guest: PID 1 (the agent, after `agent::init` mounted the basics
//! and loaded the modules) mounts the engine's root file system and data disk from virtio disks
//! found by their serial numbers, switches root into it, mounts cgroup2, brings up the network
//! of QEMU's user-mode stack, applies the sysctls and runs `dockerd` until it exits or the host
//! asks it to stop on the control port. Everything it says goes to the console.

use std::ffi::CString;
use std::fs;
use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::init::{find_port, mount, switch_root};

use crate::protocol::engine::{
    BARE_MARK, CONTAINERD_CONFIG, CONTAINERD_SOCKET, CONTROL_PORT, DOCKERD_SOCKET,
    ENGINE_READY_MARK, EngineSpec, GUEST_AGENT_COPY, GUEST_APPARMOR_TOOLS, GUEST_CODEX_DIR,
    GUEST_ENGINE_SPEC, GUEST_KERNEL_LOG, SERIAL_CODEX, SERIAL_DATA, SERIAL_ROOT,
};

/// Where the engine's root file system is mounted before the root switches to it.
const NEW_ROOT: &str = "/engine";

/// Entry point from `agent::init::run` for `nsmatrix.mode=engine`. Returning powers off.
pub fn run(t0: Instant) -> Result<()> {
    let spec: EngineSpec = serde_json::from_slice(
        &fs::read(GUEST_ENGINE_SPEC)
            .with_context(|| format!("failed to read {GUEST_ENGINE_SPEC}"))?,
    )
    .context("failed to parse the engine spec")?;
    eprintln!(
        "nsmatrix-engine: init after {} ms; /proc/self/ns/user {}; unshare(CLONE_NEWUSER) as root: {}",
        t0.elapsed().as_millis(),
        if Path::new("/proc/self/ns/user").exists() {
            "exists"
        } else {
            "absent"
        },
        probe_unshare_user()
    );
    set_clock();
    if spec.bare {
        eprintln!("{BARE_MARK}");
        return Ok(());
    }
    let root = wait_disk(SERIAL_ROOT, Duration::from_secs(20))?;
    fs::create_dir_all(NEW_ROOT)?;
    mount(Some(&root), NEW_ROOT, Some("ext4"), 0, None)?;
    if spec.data_disk {
        let data = wait_disk(SERIAL_DATA, Duration::from_secs(5))?;
        let at = format!("{NEW_ROOT}/var/lib/docker");
        fs::create_dir_all(&at)?;
        mount(Some(&data), &at, Some("ext4"), 0, None)?;
    }
    if spec.codex_disk {
        let codex = wait_disk(SERIAL_CODEX, Duration::from_secs(5))?;
        let at = format!("{NEW_ROOT}{}", GUEST_CODEX_DIR);
        fs::create_dir_all(&at)?;
        mount(Some(&codex), &at, Some("ext4"), libc::MS_RDONLY, None)?;
    }
    if spec.apparmor {
        let enabled =
            fs::read_to_string("/sys/module/apparmor/parameters/enabled").unwrap_or_default();
        if !enabled.starts_with('Y') {
            bail!(
                "this kernel has no AppArmor enabled (/sys/module/apparmor/parameters/enabled: {:?}): use a kernel with AppArmor built in and enabled, or apparmor = \"off\"",
                enabled.trim()
            );
        }
        crate::backend::qemu::guest::copy_tree(
            Path::new(GUEST_APPARMOR_TOOLS),
            Path::new(NEW_ROOT),
        )
        .context("failed to install AppArmor's tools into the engine's root")?;
    }
    // The kernel file systems come along (with /dev/pts and /dev/shm below /dev).
    for d in ["/proc", "/sys", "/dev"] {
        let to = format!("{NEW_ROOT}{d}");
        fs::create_dir_all(&to)?;
        mount(Some(d), &to, None, libc::MS_MOVE, None)?;
    }
    switch_root(NEW_ROOT)?;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    for (src, target, fstype, flags, data) in [
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev | libc::MS_NOEXEC,
            "",
        ),
    ] {
        fs::create_dir_all(target)?;
        let data = (!data.is_empty()).then_some(data);
        mount(Some(src), target, Some(fstype), flags, data)?;
    }
    if spec.apparmor {
        // What dockerd (and runc) look at to decide that AppArmor is there.
        mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nosuid_nodev | libc::MS_NOEXEC,
            None,
        )?;
        let profiles = fs::read_to_string("/sys/kernel/security/apparmor/profiles")
            .map(|p| p.lines().count())
            .unwrap_or(0);
        // Enforcement is unchanged; denials by `deny` rules (docker-default denies mounts with
        // one), which AppArmor keeps quiet by default, are logged too: evidence for the cells.
        let audit = match fs::write("/sys/module/apparmor/parameters/audit", "noquiet") {
            Ok(()) => "audit mode noquiet".to_string(),
            Err(e) => format!("audit mode unchanged ({e})"),
        };
        eprintln!(
            "nsmatrix-engine: AppArmor enabled, securityfs mounted, {profiles} profiles, {audit}"
        );
    }
    relay_kernel_log();
    network()?;
    // This binary (the same build as the host's) for containers to bind-mount as their agent:
    // no upload of tens of MB per container through the forwarded port.
    fs::copy("/proc/self/exe", GUEST_AGENT_COPY)
        .with_context(|| format!("failed to copy the agent to {}", GUEST_AGENT_COPY))?;
    for (k, v) in &spec.sysctls {
        let p = Path::new("/proc/sys").join(k.replace('.', "/"));
        fs::write(&p, v).with_context(|| format!("failed to set sysctl {k}={v}"))?;
        eprintln!("nsmatrix-engine: sysctl {k}={v}");
    }
    let containerd = match &spec.containerd_config {
        Some(config) => Some(start_containerd(config, t0)?),
        None => None,
    };
    if let Some(port) = spec.api_port {
        forward_api(port)?;
    }
    let mut dockerd = Command::new("dockerd")
        .args(&spec.dockerd_args)
        .spawn()
        .context("failed to start dockerd")?;
    let pid = dockerd.id() as libc::pid_t;
    eprintln!(
        "{ENGINE_READY_MARK} (pid {pid}, {} ms since init): dockerd {}",
        t0.elapsed().as_millis(),
        spec.dockerd_args.join(" ")
    );
    listen_for_stop(pid);
    // PID 1 reaps every orphan; the guest lives as long as dockerd does.
    let status = loop {
        let mut st = 0;
        // SAFETY: waitpid on any child with a valid status pointer.
        let got = unsafe { libc::waitpid(-1, &mut st, 0) };
        if got == pid {
            break st;
        }
        if got < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            break -1;
        }
    };
    let _ = dockerd.try_wait();
    eprintln!("nsmatrix-engine: dockerd exited (wait status {status})");
    if let Some(pid) = containerd {
        // SAFETY: kill(2) and waitpid(2) on the child we started.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
        }
    }
    // SAFETY: plain syscalls; the data disk must be consistent when a preparation boot ends.
    unsafe {
        libc::sync();
        let d = CString::new("/var/lib/docker").unwrap();
        libc::umount2(d.as_ptr(), libc::MNT_DETACH);
        libc::sync();
    }
    if status != 0 {
        bail!("dockerd exited with wait status {status}");
    }
    Ok(())
}

/// Append every record of the kernel's log from now on to [`GUEST_KERNEL_LOG`] as a text line,
/// for containers to read (printk's rate limit lifted, so a burst of audit lines is kept).
fn relay_kernel_log() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let _ = fs::write("/proc/sys/kernel/printk_ratelimit", "0");
    let (Ok(mut kmsg), Ok(mut out)) = (
        fs::File::open("/dev/kmsg"),
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(GUEST_KERNEL_LOG),
    ) else {
        eprintln!("nsmatrix-engine: the kernel's log cannot be relayed to containers");
        return;
    };
    // SAFETY: lseek on a valid fd; SEEK_END on /dev/kmsg skips the records already there.
    unsafe { libc::lseek(kmsg.as_raw_fd(), 0, libc::SEEK_END) };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        loop {
            match kmsg.read(&mut buf) {
                Ok(0) => std::thread::sleep(Duration::from_millis(50)),
                Ok(n) => {
                    // `PRI,SEQ,USEC,FLAGS;text\n KEY=value...`: the text.
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let first = rec.lines().next().unwrap_or_default();
                    let text = first.split_once(';').map_or(first, |(_, t)| t);
                    let _ = writeln!(out, "{}", text.trim_end());
                }
                // Records overwritten before they were read: go on with the oldest left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => return,
            }
        }
    });
}

/// A kernel without an RTC driver (tinyconfig) starts in 1970: take the host's time from the
/// command line (`nsmatrix.epoch=SECONDS`) when the guest's clock is far behind it.
fn set_clock() {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(epoch) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nsmatrix.epoch="))
        .and_then(|v| v.parse::<i64>().ok())
    else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if now + 3600 < epoch {
        let tv = libc::timeval {
            tv_sec: epoch,
            tv_usec: 0,
        };
        // SAFETY: settimeofday with a valid timeval and no timezone.
        let rc = unsafe { libc::settimeofday(&tv, std::ptr::null()) };
        eprintln!("nsmatrix-engine: clock was {now}, set to the host's {epoch} (rc {rc})");
    }
}

/// What `unshare(CLONE_NEWUSER)` does for root in this kernel, tried in a child process.
fn probe_unshare_user() -> String {
    // SAFETY: fork in a single-threaded PID 1; the child only calls unshare and _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let rc = libc::unshare(libc::CLONE_NEWUSER);
            let e = if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(e);
        }
        if pid < 0 {
            return "fork failed".into();
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        match libc::WEXITSTATUS(st) {
            0 => "ok".into(),
            e => format!(
                "{} ({})",
                errno_name(e),
                std::io::Error::from_raw_os_error(e)
            ),
        }
    }
}

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::ENOSPC => "ENOSPC",
        libc::ENOSYS => "ENOSYS",
        _ => "errno",
    }
}

/// Start containerd with `config` and wait until its socket answers, so that dockerd (told
/// that socket) connects at once instead of starting its own and retrying with a backoff.
/// containerd is a child of PID 1 like dockerd, stopped when dockerd has exited.
fn start_containerd(config: &str, t0: Instant) -> Result<libc::pid_t> {
    let dir = Path::new(CONTAINERD_CONFIG).parent().expect("a file path");
    fs::create_dir_all(dir)?;
    fs::write(CONTAINERD_CONFIG, config)
        .with_context(|| format!("failed to write {CONTAINERD_CONFIG}"))?;
    let child = Command::new("containerd")
        .args(["--config", CONTAINERD_CONFIG])
        .spawn()
        .context("failed to start containerd")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::os::unix::net::UnixStream::connect(CONTAINERD_SOCKET).is_err() {
        if Instant::now() > deadline {
            bail!(
                "containerd (pid {}) did not open {CONTAINERD_SOCKET} within 120 s",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "nsmatrix-engine: containerd ready (pid {}, {} ms since init)",
        child.id(),
        t0.elapsed().as_millis()
    );
    Ok(child.id() as libc::pid_t)
}

/// Forward TCP connections on `port` (the one QEMU forwards from the host's loopback) to
/// dockerd's unix socket, byte for byte in both directions (attach's upgraded streams
/// included). A connection that comes before dockerd listens is closed, and the host retries.
fn forward_api(port: u16) -> Result<()> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("failed to listen on port {port} for the engine's API"))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            std::thread::spawn(move || {
                let Ok(unix) = std::os::unix::net::UnixStream::connect(DOCKERD_SOCKET) else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let (Ok(mut tcp_in), Ok(mut unix_out)) = (tcp.try_clone(), unix.try_clone()) else {
                    return;
                };
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut tcp_in, &mut unix_out);
                    let _ = unix_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut unix_in, mut tcp_out) = (unix, tcp);
                let _ = std::io::copy(&mut unix_in, &mut tcp_out);
                let _ = tcp_out.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    Ok(())
}

/// A thread that reads the control port and sends dockerd SIGTERM on `stop`.
fn listen_for_stop(dockerd: libc::pid_t) {
    let Some(dev) = find_port(CONTROL_PORT) else {
        eprintln!("nsmatrix-engine: no control port {CONTROL_PORT}; stop by killing QEMU");
        return;
    };
    std::thread::spawn(move || {
        let Ok(f) = fs::File::open(&dev) else {
            eprintln!("nsmatrix-engine: cannot open {}", dev.display());
            return;
        };
        // A port reads end-of-file while the host side is not connected: wait and read again.
        let mut r = std::io::BufReader::new(f);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => std::thread::sleep(Duration::from_millis(100)),
                Ok(_) if line.trim() == "stop" => {
                    eprintln!("nsmatrix-engine: stop requested; sending dockerd SIGTERM");
                    // SAFETY: kill(2) on the child we started.
                    unsafe { libc::kill(dockerd, libc::SIGTERM) };
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
}

/// The block device whose virtio serial is `serial` (waiting for the driver to probe it).
pub(super) fn wait_disk(serial: &str, wait: Duration) -> Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(rd) = fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let s = fs::read_to_string(e.path().join("serial")).unwrap_or_default();
                if s.trim() == serial {
                    let dev = format!("/dev/{}", e.file_name().to_string_lossy());
                    if Path::new(&dev).exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "no virtio disk with serial {serial} after {wait:?} (are virtio_blk and ext4 loaded?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// QEMU's user-mode network: the guest is 10.0.2.15/24, the host's forwarded ports reach it.
fn network() -> Result<()> {
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", "10.0.2.15/24", "dev", "eth0"],
        &["link", "set", "eth0", "up"],
        &["route", "add", "default", "via", "10.0.2.2"],
    ] {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("failed to run ip (iproute2 in the engine's root file system)")?;
        if !out.status.success() {
            bail!(
                "ip {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}
