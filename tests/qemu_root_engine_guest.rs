//! Heavy (QEMU + root + Docker): a real Docker engine inside a QEMU guest of Debian's 6.1 kernel,
//! driven through `nsmatrix vm engine`. The bookworm image reaches the guest through the cached
//! engine data disk (never pulled); a container runs there as uid 1000; afterwards no QEMU of
//! the run and no run directory (with QEMU's snapshot overlays) is left, also after a SIGKILL.
//!
//! Cold, this builds the engine's root file system with debootstrap and prepares the data disk
//! (a few minutes under TCG); warm, each boot takes tens of seconds. Without root, QEMU, dockerd
//! or debootstrap these tests fail when `CI` is set (and not `false`/`0`) and skip loudly
//! otherwise.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false)
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (debootstrap, mkfs.ext4 -d of a root-owned tree)".into());
    }
    for tool in [
        "qemu-system-x86_64",
        "debootstrap",
        "mkfs.ext4",
        "cpio",
        "docker",
    ] {
        if !on_path(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    let ok = Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Some("no Docker engine answers on the host (images are built there)".into());
    }
    None
}

/// One guest at a time: each is a TCG QEMU, and a start sweeps the run directories of dead
/// owners, which the SIGKILL test wants to see swept by its own rerun.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn available() -> bool {
    match missing() {
        None => true,
        Some(why) if in_ci() => panic!("CI is set but the engine-guest test cannot run: {why}"),
        Some(why) => {
            eprintln!("SKIPPED LOUDLY: engine-guest test: {why}");
            false
        }
    }
}

fn nsmatrix() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nsmatrix"))
}

fn runs_dir() -> PathBuf {
    nsmatrix::artifacts::cache::cache_dir()
        .join("engine")
        .join("runs")
}

/// Run directories of the nsmatrix process `pid` (named `PID-N`).
fn run_dirs_of(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(runs_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pid}-")))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// QEMU processes whose command line names a run directory of `pid`.
fn qemus_of(pid: u32) -> Vec<u32> {
    let needle = format!("engine/runs/{pid}-");
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|p| {
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    let cmd = String::from_utf8_lossy(&cmd);
                    cmd.contains("qemu-system") && cmd.contains(&needle)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn guest_engine_runs_a_bookworm_container_and_cleans_up() {
    if !available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let child = nsmatrix()
        .args([
            "vm",
            "engine",
            "--kernel",
            "debian-6.1",
            "--image",
            "bookworm",
            "--run",
            "bookworm",
            "--user",
            "1000",
            "--",
            "sh",
            "-c",
            "echo uid=$(id -u); bwrap --version; cat /proc/sys/kernel/osrelease",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nsmatrix vm engine");
    let pid = child.id();
    let out = child.wait_with_output().expect("nsmatrix vm engine");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nsmatrix vm engine failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The engine in the guest answered info/version, on the guest's kernel, not the host's.
    assert!(stdout.contains("engine: docker 20.10"), "{stdout}");
    assert!(stdout.contains("storage overlay2"), "{stdout}");
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let kernel_line = stdout
        .lines()
        .find(|l| l.starts_with("kernel: debian-6.1 (6.1."))
        .unwrap_or_else(|| panic!("no guest kernel line:\n{stdout}"));
    assert!(!kernel_line.contains(host_release.trim()), "{kernel_line}");
    // The container ran as uid 1000 with the image's bwrap, on the guest's kernel.
    assert!(stdout.contains("uid=1000"), "{stdout}");
    assert!(stdout.contains("bubblewrap 0.8.0"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("6.1.") && !l.contains(host_release.trim())),
        "{stdout}"
    );
    assert!(stdout.contains("container: exit 0"), "{stdout}");
    assert!(stdout.contains("run directory removed: true"), "{stdout}");
    assert!(run_dirs_of(pid).is_empty(), "{:?}", run_dirs_of(pid));
    assert!(qemus_of(pid).is_empty(), "QEMU left: {:?}", qemus_of(pid));
}

#[test]
fn a_sigkilled_engine_leaves_no_guest_and_a_rerun_sweeps_its_files() {
    if !available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = nsmatrix()
        .args(["vm", "engine", "--kernel", "debian-6.1", "--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nsmatrix vm engine --keep");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if line.starts_with("DOCKER_HOST=tcp://127.0.0.1:") {
            ready = true;
            break;
        }
    }
    assert!(ready, "the engine never became ready");
    assert_eq!(qemus_of(pid).len(), 1, "one QEMU while the engine runs");
    assert_eq!(run_dirs_of(pid).len(), 1);
    // SAFETY: kill(2) of the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = child.wait();
    // QEMU dies with its parent (parent-death signal), without any help.
    let t = Instant::now();
    while !qemus_of(pid).is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        qemus_of(pid).is_empty(),
        "QEMU outlived its SIGKILLed parent"
    );
    // Its run directory (console log, snapshot overlays) is left for the next start to sweep.
    let left = run_dirs_of(pid);
    assert_eq!(left.len(), 1);
    let bare = nsmatrix()
        .args(["vm", "engine", "--kernel", "debian-6.1", "--bare-boot"])
        .output()
        .expect("rerun");
    assert!(
        bare.status.success(),
        "{}",
        String::from_utf8_lossy(&bare.stderr)
    );
    assert!(
        left.iter().all(|d| !Path::new(d).exists()),
        "the rerun did not sweep {left:?}"
    );
}

#[test]
fn an_engine_that_cannot_start_is_an_error_with_the_console_tail_and_leaves_nothing() {
    if !available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    // The guest's init cannot set a sysctl that does not exist and stops before dockerd.
    let child = nsmatrix()
        .args([
            "vm",
            "engine",
            "--kernel",
            "debian-6.1",
            "--sysctl",
            "nsmatrix.no_such_knob=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nsmatrix vm engine");
    let pid = child.id();
    let out = child.wait_with_output().expect("nsmatrix vm engine");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("ended before the engine answered"),
        "{stderr}"
    );
    assert!(stderr.contains("console tail"), "{stderr}");
    assert!(
        stderr.contains("failed to set sysctl nsmatrix.no_such_knob=1"),
        "{stderr}"
    );
    assert!(run_dirs_of(pid).is_empty(), "{:?}", run_dirs_of(pid));
    assert!(qemus_of(pid).is_empty(), "QEMU left: {:?}", qemus_of(pid));
}
