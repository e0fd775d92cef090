//! Engine guests: a real Docker engine (Debian's docker.io, containerd and runc) running in a
//! QEMU guest of a chosen kernel, driven from the host through bollard like any other engine.
//!
//! [`start_guest_engine`] boots the kernel with the static nsmatrix binary as PID 1 in
//! `nsmatrix.mode=engine` ([`guest`]); it mounts the engine's root file system (an ext4 image
//! used through `snapshot=on`, so the cached image is never written) and, when images are asked
//! for, a data disk holding `/var/lib/docker` prepared once per image set ([`data`]). dockerd
//! listens on its unix socket, which the guest's init forwards TCP port 2375 to; QEMU's
//! user-mode network (`restrict=on`: the guest reaches nothing outside) forwards
//! `127.0.0.1:PORT` on the host to that port, so the engine is only
//! reachable from this machine's loopback. [`GuestEngine::shutdown`] kills QEMU and removes the
//! run directory with QEMU's snapshot files; a run directory whose owner died (SIGKILL) is swept,
//! with its QEMU, by the next start.

pub mod check_config;
pub mod data;
pub mod disks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::artifacts::kernels::{self, Kernel, KernelFacts};
use crate::backend::qemu::Accel;
pub use crate::protocol::engine::{
    BARE_MARK, CONTAINERD_SOCKET, CONTROL_PORT, DOCKERD_SOCKET, ENGINE_READY_MARK, EngineSpec,
    GUEST_AGENT_COPY, GUEST_CODEX_DIR, GUEST_ENGINE_SPEC, GUEST_KERNEL_LOG, SERIAL_CODEX,
    SERIAL_DATA, SERIAL_ROOT,
};
use crate::text::tail_of_file as tail_of;

/// dockerd's TCP port inside the guest (reachable only through the host's loopback forward).
pub const GUEST_ENGINE_PORT: u16 = 2375;

/// dockerd's flags in the guest: no iptables, no default bridge (containers run with
/// `--network none`), overlay2 on the data disk, the API on a unix socket (which the guest's
/// init forwards to from [`GUEST_ENGINE_PORT`]), and the containerd the init started first.
pub fn default_dockerd_args() -> Vec<String> {
    [
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--storage-driver=overlay2",
        &format!("--host=unix://{DOCKERD_SOCKET}"),
        &format!("--containerd={CONTAINERD_SOCKET}"),
        // Every console line costs under TCG; warnings and errors still reach the console log.
        "--log-level=warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// containerd's configuration in the guest: what dockerd's own managed containerd would run,
/// without the plugins Docker does not use (CRI, the snapshotters other than overlayfs), its
/// state in the guest's memory (Docker 20.10 keeps images and containers in its own
/// directories, never in containerd's).
/// Started by the init before dockerd, it saves dockerd's connection backoff (measured: about
/// 1.4 s of a 9 s engine start under TCG).
pub fn default_containerd_config() -> String {
    format!(
        r#"version = 2
root = "/run/containerd/root"
state = "/run/containerd/daemon"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[debug]
  level = "warn"
"#
    )
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub kernel: String,
    pub sysctls: BTreeMap<String, String>,
    /// A prepared data disk (`data::ensure_data_disk`), used copy-on-write.
    pub data_disk: Option<PathBuf>,
    /// The data disk is written in place (only while preparing it).
    pub data_disk_writable: bool,
    /// A Codex package version to attach read-only at [`GUEST_CODEX_DIR`].
    pub codex: Option<String>,
    /// Expose the kernel's AppArmor to the engine (securityfs and `apparmor_parser`), so
    /// dockerd confines containers with `docker-default` as on a Debian or Ubuntu host.
    pub apparmor: bool,
    pub memory_mb: u32,
    pub ready_timeout: Duration,
}

impl EngineOptions {
    pub fn new(kernel: &str) -> Self {
        EngineOptions {
            kernel: kernel.to_string(),
            sysctls: BTreeMap::new(),
            data_disk: None,
            data_disk_writable: false,
            codex: None,
            apparmor: false,
            memory_mb: 1536,
            ready_timeout: Duration::from_secs(180),
        }
    }
}

/// When things happened, from QEMU's start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineTimings {
    /// The guest's PID 1 printed its first engine line (kernel booted, modules loaded).
    pub init: Option<Duration>,
    /// dockerd was started.
    pub dockerd_started: Option<Duration>,
    /// The engine answered `/_ping` through the forwarded port.
    pub ready: Duration,
}

/// A running engine guest. End it with [`GuestEngine::shutdown`] (or [`GuestEngine::stop`] to
/// let dockerd exit cleanly first); dropping it kills QEMU and removes the run directory too.
pub struct GuestEngine {
    /// `tcp://127.0.0.1:PORT`: what `DOCKER_HOST` would be for the Docker CLI or backend.
    pub endpoint: String,
    pub docker: Docker,
    pub console_log: PathBuf,
    pub run_dir: PathBuf,
    pub kernel: KernelFacts,
    pub accel: Accel,
    pub timings: EngineTimings,
    /// The guest's own answer to `unshare(CLONE_NEWUSER)` as root (from the console).
    pub userns_probe: String,
    child: Option<Child>,
}

pub(crate) fn qemu_binary() -> PathBuf {
    std::env::var_os("NSMATRIX_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// TCG unless `$NSMATRIX_QEMU_ACCEL=kvm`: an engine guest boots for minutes of work, and a
/// KVM that hangs (as on machines whose probe falls back) would cost the whole timeout.
pub(crate) fn choose_accel() -> (Accel, &'static str) {
    match std::env::var("NSMATRIX_QEMU_ACCEL").as_deref() {
        Ok("kvm") => (Accel::Kvm, "kvm (NSMATRIX_QEMU_ACCEL)"),
        _ => (Accel::Tcg, "tcg"),
    }
}

fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

fn runs_dir() -> PathBuf {
    disks::engine_dir().join("runs")
}

/// A fresh run directory owned by this process (`owner` holds the pid and its start time).
fn new_run_dir() -> Result<PathBuf> {
    sweep_stale_runs();
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = runs_dir().join(format!("{}-{n}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    std::fs::write(
        dir.join("owner"),
        owner_tag(std::process::id()).unwrap_or_default(),
    )?;
    Ok(dir)
}

/// `<pid> <start time in ticks>` of a live process, to tell a reused pid from the owner.
fn owner_tag(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Remove the run directories of dead owners, killing their QEMU first (it is recognised by
/// its pid file and by the run directory on its command line).
pub fn sweep_stale_runs() -> usize {
    let Ok(rd) = std::fs::read_dir(runs_dir()) else {
        return 0;
    };
    let mut swept = 0;
    for e in rd.flatten() {
        let dir = e.path();
        let owner = std::fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let pid: Option<u32> = owner.split_whitespace().next().and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|p| owner_tag(p).as_deref() == Some(owner.trim()));
        if alive {
            continue;
        }
        kill_qemu_of(&dir);
        if std::fs::remove_dir_all(&dir).is_ok() {
            swept += 1;
        }
    }
    swept
}

fn kill_qemu_of(dir: &Path) {
    let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.to_string_lossy();
    if String::from_utf8_lossy(&cmdline).contains(needle.as_ref()) {
        // SAFETY: kill(2) of a QEMU whose command line names our run directory.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        for _ in 0..50 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A free TCP port on the host's loopback (QEMU binds it right after; a race is retried).
fn free_loopback_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("no free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

struct Boot {
    argv: Vec<String>,
    port: u16,
}

#[allow(clippy::too_many_arguments)]
fn qemu_argv(
    accel: Accel,
    kernel: &Kernel,
    initrd: &Path,
    run_dir: &Path,
    memory_mb: u32,
    disks: &[(&Path, &str, bool)],
    port: Option<u16>,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-machine", "pc", "-accel", accel.as_str(), "-smp", "1"]);
    push(&["-cpu", cpu_model(accel), "-m", &memory_mb.to_string()]);
    push(&["-pidfile", &run_dir.join("qemu.pid").to_string_lossy()]);
    // The same kernel binary as the bzImage, booted through its PVH entry where it has one
    // (no emulated decompressor), as plain guests are.
    push(&[
        "-kernel",
        &crate::backend::qemu::guest::boot_image(kernel).to_string_lossy(),
        "-initrd",
        &initrd.to_string_lossy(),
    ]);
    push(&[
        "-append",
        &format!(
            "{} rdinit={} nsmatrix.mode=engine nsmatrix.epoch={}",
            crate::backend::qemu::BOOT_ARGS,
            crate::agent::init::GUEST_AGENT,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
    ]);
    push(&[
        "-chardev",
        &format!("file,id=con,path={}", run_dir.join("console.log").display()),
        "-serial",
        "chardev:con",
    ]);
    push(&["-device", "virtio-serial-pci,id=vser"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=ctl,path={},server=on,wait=off",
            run_dir.join("control.sock").display()
        ),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vser.0,chardev=ctl,name={CONTROL_PORT}"),
    ]);
    push(&["-device", "virtio-rng-pci"]);
    for (i, (file, serial, writable)) in disks.iter().enumerate() {
        let mut drive = format!("if=none,id=d{i},format=raw,file={}", file.display());
        if !writable {
            // Writes go to a temporary file in $TMPDIR (the run directory), never to the image.
            drive.push_str(",snapshot=on");
        }
        push(&["-drive", &drive]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=d{i},serial={serial}"),
        ]);
    }
    if let Some(port) = port {
        push(&[
            "-netdev",
            &format!("user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_ENGINE_PORT}"),
            "-device",
            "virtio-net-pci,netdev=net0",
        ]);
    }
    a
}

/// The per-boot initramfs: the cached base with a small archive holding the spec appended.
fn boot_initrd(
    base: &Path,
    extra: Option<&Path>,
    spec: &EngineSpec,
    run_dir: &Path,
) -> Result<PathBuf> {
    let stage = run_dir.join("initrd-stage");
    let spec_path = stage.join(GUEST_ENGINE_SPEC.trim_start_matches('/'));
    std::fs::create_dir_all(spec_path.parent().unwrap())?;
    std::fs::write(&spec_path, serde_json::to_vec_pretty(spec)?)?;
    let part = run_dir.join("spec.cpio");
    disks::write_cpio(&stage, &part)?;
    let out = run_dir.join("initrd.cpio");
    let mut bytes = std::fs::read(base)?;
    if let Some(extra) = extra {
        bytes.extend(std::fs::read(extra)?);
    }
    bytes.extend(std::fs::read(&part)?);
    std::fs::write(&out, bytes)?;
    std::fs::remove_dir_all(&stage).ok();
    Ok(out)
}

fn spawn_qemu(argv: &[String], run_dir: &Path) -> Result<Child> {
    let stderr = std::fs::File::create(run_dir.join("qemu.stderr"))?;
    let mut cmd = Command::new(qemu_binary());
    cmd.args(argv)
        .env("TMPDIR", run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; QEMU dies with the thread that started it, so a
    // SIGKILLed nsmatrix leaves no guest behind (the sweep handles the rest).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("failed to start {}", qemu_binary().display()))
}

/// Time from QEMU's start until a bare boot of `kernel` (init, then power off) has ended.
pub async fn bare_boot(kernel_name: &str) -> Result<Duration> {
    let name = kernel_name.to_string();
    let (kernel, base) = tokio::task::spawn_blocking(move || -> Result<_> {
        let kernel = kernels::ensure(&name)?;
        let base = disks::base_initrd(&kernel)?;
        Ok((kernel, base))
    })
    .await
    .context("the bare boot's provisioning panicked")??;
    let (accel, _) = choose_accel();
    let run_dir = new_run_dir()?;
    let spec = EngineSpec {
        bare: true,
        ..EngineSpec::default()
    };
    let initrd = boot_initrd(&base, None, &spec, &run_dir)?;
    let argv = qemu_argv(accel, &kernel, &initrd, &run_dir, 512, &[], None);
    let t0 = Instant::now();
    let mut child = spawn_qemu(&argv, &run_dir)?;
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
    let took = t0.elapsed();
    let console = run_dir.join("console.log");
    let saw = std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains(BARE_MARK);
    let tail = tail_of(&console, 15);
    let _ = child.start_kill();
    let _ = child.wait().await;
    std::fs::remove_dir_all(&run_dir).ok();
    match status {
        Ok(Ok(_)) if saw => Ok(took),
        Ok(_) => bail!("the bare boot of {kernel_name} did not finish its init; console:\n{tail}"),
        Err(_) => bail!("the bare boot of {kernel_name} took over 120 s; console:\n{tail}"),
    }
}

/// Boot `opts.kernel` with a Docker engine and wait until it answers through bollard.
pub async fn start_guest_engine(opts: &EngineOptions) -> Result<GuestEngine> {
    // Fetching or building these takes minutes the first time, and each waits for a cache
    // lock that another guest of this run may hold: on a blocking thread, not on a worker.
    let (name, codex, with_apparmor) = (opts.kernel.clone(), opts.codex.clone(), opts.apparmor);
    let (kernel, base, root, codex, apparmor) =
        tokio::task::spawn_blocking(move || -> Result<_> {
            let kernel = kernels::ensure(&name)?;
            let base = disks::base_initrd(&kernel)?;
            let root = disks::engine_rootfs_image()?;
            let codex = codex.as_deref().map(disks::codex_disk).transpose()?;
            let apparmor = if with_apparmor {
                Some(disks::apparmor_tools()?)
            } else {
                None
            };
            Ok((kernel, base, root, codex, apparmor))
        })
        .await
        .context("the engine guest's provisioning panicked")??;
    let (accel, _) = choose_accel();
    let mut last_err = None;
    for _attempt in 0..3 {
        let run_dir = new_run_dir()?;
        let spec = EngineSpec {
            sysctls: opts.sysctls.clone(),
            dockerd_args: default_dockerd_args(),
            bare: false,
            data_disk: opts.data_disk.is_some(),
            codex_disk: codex.is_some(),
            containerd_config: Some(default_containerd_config()),
            api_port: Some(GUEST_ENGINE_PORT),
            apparmor: opts.apparmor,
        };
        let initrd = boot_initrd(&base, apparmor.as_deref(), &spec, &run_dir)?;
        let mut disks_list: Vec<(&Path, &str, bool)> = vec![(&root, SERIAL_ROOT, false)];
        if let Some(d) = &opts.data_disk {
            disks_list.push((d, SERIAL_DATA, opts.data_disk_writable));
        }
        if let Some(c) = &codex {
            disks_list.push((c, SERIAL_CODEX, false));
        }
        let port = free_loopback_port()?;
        let boot = Boot {
            argv: qemu_argv(
                accel,
                &kernel,
                &initrd,
                &run_dir,
                opts.memory_mb,
                &disks_list,
                Some(port),
            ),
            port,
        };
        match boot_and_wait(&boot, &run_dir, &kernel, accel, opts.ready_timeout).await {
            Ok(e) => return Ok(e),
            Err((e, retry)) => {
                std::fs::remove_dir_all(&run_dir).ok();
                if !retry {
                    return Err(e);
                }
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow!("the engine guest did not start")))
}

/// Errors carry whether another port is worth a try (QEMU could not bind the forward).
async fn boot_and_wait(
    boot: &Boot,
    run_dir: &Path,
    kernel: &Kernel,
    accel: Accel,
    timeout: Duration,
) -> Result<GuestEngine, (anyhow::Error, bool)> {
    let console = run_dir.join("console.log");
    let t0 = Instant::now();
    let mut child = spawn_qemu(&boot.argv, run_dir).map_err(|e| (e, false))?;
    let endpoint = format!("tcp://127.0.0.1:{}", boot.port);
    let docker = Docker::connect_with_http(&endpoint, 5, bollard::API_DEFAULT_VERSION)
        .map_err(|e| (anyhow!("bollard cannot use {endpoint}: {e}"), false))?;
    let mut timings = EngineTimings::default();
    let mut userns_probe = String::new();
    let fail = |why: String, child: &mut Child| {
        let _ = child.start_kill();
        let tail = tail_of(&console, 40);
        anyhow!(
            "the engine guest of {} {why}; console tail:\n{tail}",
            kernel.facts.name
        )
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(run_dir.join("qemu.stderr")).unwrap_or_default();
            let retry = err.contains("hostfwd") || err.contains("forwarding rule");
            let e = fail(
                format!(
                    "ended before the engine answered (QEMU {status}; {})",
                    err.trim()
                ),
                &mut child,
            );
            let _ = child.wait().await;
            return Err((e, retry));
        }
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if timings.init.is_none()
            && let Some(line) = text
                .lines()
                .find(|l| l.contains("nsmatrix-engine: init after"))
        {
            timings.init = Some(t0.elapsed());
            userns_probe = line
                .split_once("unshare(CLONE_NEWUSER) as root: ")
                .map(|(_, r)| r.trim().to_string())
                .unwrap_or_default();
        }
        if timings.dockerd_started.is_none() && text.contains(ENGINE_READY_MARK) {
            timings.dockerd_started = Some(t0.elapsed());
        }
        if text.contains("Kernel panic - not syncing") {
            let e = fail("panicked".into(), &mut child);
            let _ = child.wait().await;
            return Err((e, false));
        }
        if timings.dockerd_started.is_some()
            && tokio::time::timeout(Duration::from_secs(2), docker.ping())
                .await
                .is_ok_and(|r| r.is_ok())
        {
            timings.ready = t0.elapsed();
            break;
        }
        if t0.elapsed() > timeout {
            let e = fail(format!("did not answer within {timeout:?}"), &mut child);
            let _ = child.wait().await;
            return Err((e, false));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let docker = docker
        .with_timeout(Duration::from_secs(120))
        .negotiate_version()
        .await
        .map_err(|e| {
            (
                anyhow!("version negotiation with the guest engine: {e}"),
                false,
            )
        })?;
    Ok(GuestEngine {
        endpoint,
        docker,
        console_log: console,
        run_dir: run_dir.to_path_buf(),
        kernel: kernel.facts.clone(),
        accel,
        timings,
        userns_probe,
        child: Some(child),
    })
}

impl GuestEngine {
    /// Kill QEMU, wait for it, remove the run directory (snapshot files, console log). The
    /// console log's tail is returned for callers that keep it.
    pub async fn shutdown(mut self) -> Result<String> {
        let tail = tail_of(&self.console_log, 40);
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        std::fs::remove_dir_all(&self.run_dir)
            .with_context(|| format!("failed to remove {}", self.run_dir.display()))?;
        Ok(tail)
    }

    /// Ask dockerd to exit (control port), wait for the guest to power off, then clean up as
    /// [`GuestEngine::shutdown`]. For a data disk being prepared: its file system is synced.
    pub async fn stop(mut self, wait: Duration) -> Result<String> {
        let sock = self.run_dir.join("control.sock");
        {
            use std::io::Write as _;
            let mut s = std::os::unix::net::UnixStream::connect(&sock)
                .with_context(|| format!("failed to connect to {}", sock.display()))?;
            s.write_all(b"stop\n")?;
            s.flush()?;
        }
        let Some(mut c) = self.child.take() else {
            bail!("no QEMU process");
        };
        let exited = tokio::time::timeout(wait, c.wait()).await;
        let tail = tail_of(&self.console_log, 40);
        let _ = c.start_kill();
        let _ = c.wait().await;
        std::fs::remove_dir_all(&self.run_dir).ok();
        match exited {
            Ok(Ok(_)) if tail.contains("dockerd exited (wait status 0)") => Ok(tail),
            Ok(_) => bail!("dockerd did not stop cleanly; console tail:\n{tail}"),
            Err(_) => bail!("the guest did not power off within {wait:?}; console tail:\n{tail}"),
        }
    }
}

impl Drop for GuestEngine {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.start_kill();
            // Best effort without a runtime: QEMU exits at SIGKILL; remove its files.
            let _ = c.try_wait();
        }
        std::fs::remove_dir_all(&self.run_dir).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Kernel {
        Kernel {
            dir: "/k".into(),
            facts: KernelFacts {
                name: "debian-6.1".into(),
                release: "6.1.0-1-amd64".into(),
                origin: "linux-image-6.1.0-1-amd64@6.1.1-1".into(),
                user_ns: true,
                sysctls: vec![],
                modules: vec![],
            },
        }
    }

    #[test]
    fn the_api_is_forwarded_on_loopback_only_and_disks_are_copy_on_write() {
        let a = qemu_argv(
            Accel::Tcg,
            &kernel(),
            Path::new("/r/initrd.cpio"),
            Path::new("/r"),
            1536,
            &[
                (Path::new("/c/root.ext4"), SERIAL_ROOT, false),
                (Path::new("/c/data.ext4"), SERIAL_DATA, true),
            ],
            Some(40000),
        )
        .join(" ");
        for want in [
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40000-:2375",
            "file=/c/root.ext4,snapshot=on",
            "serial=nsm-engine-root",
            "serial=nsm-engine-data",
            "nsmatrix.mode=engine",
            "-pidfile /r/qemu.pid",
            "name=nsmatrix.control",
            "-no-reboot",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        // The disk being prepared is written in place; nothing listens beyond loopback.
        assert!(!a.contains("file=/c/data.ext4,snapshot=on"), "{a}");
        assert!(!a.contains("hostfwd=tcp::"), "{a}");
        assert!(!a.contains("0.0.0.0"), "{a}");
    }

    #[test]
    fn a_bare_boot_has_no_network_and_no_disks() {
        let a = qemu_argv(
            Accel::Tcg,
            &kernel(),
            Path::new("/r/i"),
            Path::new("/r"),
            512,
            &[],
            None,
        )
        .join(" ");
        assert!(!a.contains("-netdev"), "{a}");
        assert!(!a.contains("virtio-blk"), "{a}");
    }

    #[test]
    fn dockerd_flags_are_the_measured_ones() {
        let a = default_dockerd_args().join(" ");
        for want in [
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=overlay2",
            "--host=unix:///run/docker.sock",
            "--containerd=/run/containerd/containerd.sock",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        // Never a TCP listener in the guest's dockerd: the init forwards the port to the socket.
        assert!(!a.contains("tcp://"), "{a}");
        let c = default_containerd_config();
        let parsed: toml::Value = toml::from_str(&c).unwrap();
        assert_eq!(
            parsed["grpc"]["address"].as_str(),
            Some("/run/containerd/containerd.sock")
        );
        assert!(c.contains("io.containerd.grpc.v1.cri"), "{c}");
    }

    #[test]
    fn owner_tag_tells_this_process() {
        let me = owner_tag(std::process::id()).unwrap();
        assert!(me.starts_with(&format!("{} ", std::process::id())), "{me}");
        assert!(owner_tag(u32::MAX).is_none());
    }
}
