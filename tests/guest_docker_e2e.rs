//! Heavy (QEMU + root + Docker): `nsmatrix run` on a small matrix of the guest-docker backend
//! boots a real Docker engine inside a QEMU guest of the Synology-like 5.10 kernel, runs a
//! container there, and reads the incident's message from it; afterwards nothing of the run is
//! left: no QEMU started by it, no run directory (with QEMU's copy-on-write overlays) and no
//! container labelled with its run. An engine that cannot start is ERROR with the console's
//! tail, never SKIP or PASS; an interrupted run leaves nothing either, and a killed one leaves
//! no QEMU and its overlays go with the next run.
//!
//! Warm (kernel, engine root file system, data disk cached), each run boots one guest: tens of
//! seconds under TCG. Without root, QEMU or a Docker engine on the host these tests fail when
//! `CI` is set and skip loudly otherwise.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, read_json, require};

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false)
}

fn available() -> bool {
    let docker_ok = || {
        Command::new("docker")
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    require(common::is_root(), "root (engine guests, debootstrap)")
        && require(on_path("qemu-system-x86_64"), "qemu-system-x86_64")
        && require(on_path("mkfs.ext4"), "mkfs.ext4")
        && require(
            docker_ok(),
            "a Docker engine on the host (images are built there)",
        )
}

/// One run at a time: each boots a TCG guest on a small machine.
static ONE_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn runs_dir() -> PathBuf {
    nsmatrix::artifacts::cache::cache_dir()
        .join("engine")
        .join("runs")
}

fn matrix(dir: &Path, sysctl_set: Option<(&str, &str)>) -> PathBuf {
    let scen = common::repo().join("scenarios");
    let mut t = format!(
        r#"[settings]
retries = 0

[profile.default]
seccomp = "default"

[image.bookworm]
recipe = "bookworm"

[[environment]]
name = "gd"
backend = "guest-docker"
kernel = "synology-like-5.10"
image = "bookworm"
profile = "default"
uid = 0
{sysctl}

[[subject]]
name = "bwrap"
kind = "bwrap"
build = "system"
setuid = "as-is"
argv = "codex-legacy"

[[scenarios]]
name = "smoke"
dir = "{}"
only = ["add_file"]

[[expect]]
when = {{ backend = "guest-docker" }}
fail = "userns-denied"
"#,
        scen.display(),
        sysctl = if sysctl_set.is_some() {
            "sysctl = \"broken\""
        } else {
            ""
        }
    );
    if let Some((k, v)) = sysctl_set {
        t.push_str(&format!("\n[sysctl-set.broken]\n\"{k}\" = \"{v}\"\n"));
    }
    let p = dir.join("m.toml");
    std::fs::write(&p, t).unwrap();
    p
}

/// Run directories and QEMU processes of the nsmatrix process `pid`.
fn leftovers_of(pid: u32) -> Vec<String> {
    let prefix = format!("{pid}-");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(runs_dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                out.push(format!("run directory {}", e.path().display()));
            }
        }
    }
    let needle = runs_dir().join(&prefix).display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            out.push(format!("QEMU {}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

fn containers_of(run_id: &str) -> String {
    let o = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=nsmatrix.run={run_id}"),
            "--format",
            "{{.ID}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Run `nsmatrix run` on `m`; `interrupt_after` sends SIGINT once stderr shows that line.
fn run(m: &Path, out: &Path, interrupt_after: Option<&str>) -> (u32, i32, String) {
    let mut child = Command::new(bin())
        .args(["run", "-q", "--matrix"])
        .arg(m)
        .arg("--out")
        .arg(out)
        .current_dir(common::repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    let mut err = String::new();
    let t0 = Instant::now();
    for l in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(mark) = interrupt_after
            && l.contains(mark)
        {
            // SAFETY: kill(2) of the child we started.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
        err.push_str(&l);
        err.push('\n');
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "the run took over 15 min:\n{err}"
        );
    }
    let status = child.wait().unwrap();
    let text = format!("{}{err}", out_thread.join().unwrap());
    (pid, status.code().unwrap_or(-1), text)
}

#[test]
fn a_container_in_a_guest_engine_shows_the_incident_and_leaves_nothing() {
    if !available() {
        return;
    }
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (pid, code, text) = run(&matrix(dir.path(), None), &out, None);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("engine guest of synology-like-5.10 ready"),
        "{text}"
    );
    let r = read_json(&out.join("results.json"));
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 1, "{text}");
    let c = &cells[0];
    assert_eq!(c["backend"], "guest-docker");
    assert_eq!(c["status"], "XFAIL", "{c:#}");
    // bwrap's line plus the observed facts (a seccomp filter in force) name the member of the
    // `userns-denied` family the matrix expects.
    assert_eq!(c["observed"], "userns-denied-seccomp", "{c:#}");
    assert_eq!(
        c["stderr-tail"].as_str().unwrap().trim(),
        "bwrap: Creating new namespace failed: Operation not permitted",
        "{c:#}"
    );
    // The agent ran on the guest's kernel, not this machine's.
    let batch = &r["batches"][0];
    assert!(
        batch["facts"]["kernel.osrelease"]
            .as_str()
            .unwrap()
            .starts_with("5.10."),
        "{batch:#}"
    );
    assert_eq!(leftovers_of(pid), Vec::<String>::new());
    assert_eq!(
        containers_of(&format!("{}-{pid}", r["run-name"].as_str().unwrap())),
        ""
    );
}

#[test]
fn an_engine_that_does_not_start_is_an_error_with_the_console_tail() {
    if !available() {
        return;
    }
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // The guest's init fails to write a sysctl its kernel does not have: dockerd never starts.
    let m = matrix(dir.path(), Some(("kernel.nsmatrix_no_such_knob", "1")));
    let (pid, code, text) = run(&m, &out, None);
    assert_ne!(code, 0, "{text}");
    let r = read_json(&out.join("results.json"));
    let c = &r["cells"][0];
    assert_eq!(c["status"], "ERROR", "{c:#}");
    let msg = c["message"].as_str().unwrap_or_default();
    assert!(msg.contains("did not start"), "{msg}");
    assert!(msg.contains("console tail"), "{msg}");
    assert!(msg.contains("kernel.nsmatrix_no_such_knob"), "{msg}");
    assert_eq!(leftovers_of(pid), Vec::<String>::new());
}

#[test]
fn an_interrupted_run_leaves_no_guest() {
    if !available() {
        return;
    }
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (pid, _code, text) = run(
        &matrix(dir.path(), None),
        &out,
        Some("engine guest of synology-like-5.10 ready"),
    );
    assert!(text.contains("interrupted"), "{text}");
    assert_eq!(leftovers_of(pid), Vec::<String>::new(), "{text}");
}

#[test]
fn a_killed_run_leaves_no_guest_and_its_overlays_go_with_the_next_run() {
    if !available() {
        return;
    }
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let m = matrix(dir.path(), None);
    let mut child = Command::new(bin())
        .args(["run", "-q", "--matrix"])
        .arg(&m)
        .arg("--out")
        .arg(dir.path().join("killed"))
        .current_dir(common::repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut err = String::new();
    for l in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        err.push_str(&l);
        err.push('\n');
        if l.contains("engine guest of synology-like-5.10 ready") {
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(err.contains("ready"), "{status}: {err}");
    // QEMU dies with its parent (parent-death signal); its run directory is left for a sweep.
    let deadline = Instant::now() + Duration::from_secs(10);
    let qemu_left = || {
        leftovers_of(pid)
            .into_iter()
            .filter(|l| l.starts_with("QEMU"))
            .collect::<Vec<_>>()
    };
    while !qemu_left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(qemu_left(), Vec::<String>::new());
    let (pid2, code, text) = run(&m, &dir.path().join("rerun"), None);
    assert_eq!(code, 0, "{text}");
    assert_eq!(leftovers_of(pid), Vec::<String>::new(), "{text}");
    assert_eq!(leftovers_of(pid2), Vec::<String>::new(), "{text}");
}

/// An engine guest of debian-6.1 with AppArmor exposed: dockerd confines the container with
/// docker-default, under which an unprivileged bwrap without Docker's seccomp filter prints
/// `Failed to make / slave: Permission denied` (openai/codex #15434); the same container with
/// `apparmor = "unconfined"` gets past that mount. Both cells carry the label the agent read.
#[test]
fn docker_default_apparmor_in_a_guest_engine_denies_bwrap_its_mount() {
    if !available() {
        return;
    }
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let scen = common::repo().join("scenarios");
    let m = dir.path().join("m.toml");
    std::fs::write(
        &m,
        format!(
            r#"[settings]
retries = 0

[profile.seccomp-unconfined]
seccomp = "unconfined"

[profile."seccomp-unconfined+apparmor-unconfined"]
seccomp = "unconfined"
apparmor = "unconfined"

[image.bookworm]
recipe = "bookworm"

[[environment]]
name = "gda"
backend = "guest-docker"
kernel = "debian-6.1"
apparmor = "on"
image = "bookworm"
profile = ["seccomp-unconfined", "seccomp-unconfined+apparmor-unconfined"]
uid = 1000

[[subject]]
name = "bwrap"
kind = "bwrap"
build = "system"
setuid = false
argv = "codex"

[[scenarios]]
name = "smoke"
dir = "{}"
only = ["add_file"]

[[expect]]
when = {{ profile = "seccomp-unconfined" }}
fail = "lsm-mount-denied"

[[expect]]
when = {{ profile = "seccomp-unconfined+apparmor-unconfined" }}
fail = "proc-mount-denied"
"#,
            scen.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let (pid, code, text) = run(&m, &out, None);
    assert_eq!(code, 0, "{text}");
    let r = read_json(&out.join("results.json"));
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2, "{text}");
    let confined = cells
        .iter()
        .find(|c| c["axes"]["profile"] == "seccomp-unconfined")
        .unwrap();
    assert_eq!(confined["status"], "XFAIL", "{confined:#}");
    assert_eq!(confined["observed"], "lsm-mount-denied", "{confined:#}");
    assert_eq!(
        confined["stderr-tail"].as_str().unwrap().trim(),
        "bwrap: Failed to make / slave: Permission denied",
        "{confined:#}"
    );
    assert_eq!(
        confined["details"]["apparmor"], "docker-default (enforce)",
        "{confined:#}"
    );
    // The guest logs docker-default's quiet `deny mount` (audit mode noquiet) and relays its
    // kernel's log into the container: the cell carries the denial.
    let log = confined["details"]["kernel.log"]
        .as_str()
        .unwrap_or_default();
    assert!(
        log.contains("apparmor=\"DENIED\" operation=\"mount\"")
            && log.contains("profile=\"docker-default\"")
            && log.contains("comm=\"bwrap\""),
        "{confined:#}"
    );
    let unconfined = cells
        .iter()
        .find(|c| c["axes"]["profile"] == "seccomp-unconfined+apparmor-unconfined")
        .unwrap();
    assert_eq!(unconfined["status"], "XFAIL", "{unconfined:#}");
    assert!(
        unconfined["details"].get("apparmor").is_none(),
        "an unconfined container records no AppArmor label: {unconfined:#}"
    );
    assert!(
        !unconfined["details"]["kernel.log"]
            .as_str()
            .unwrap_or_default()
            .contains("DENIED"),
        "{unconfined:#}"
    );
    for b in r["batches"].as_array().unwrap() {
        let label = b["facts"]["agent.apparmor"].as_str().unwrap_or_default();
        let want = if b["environment"]
            .as_str()
            .unwrap()
            .contains("apparmor-unconfined")
        {
            "unconfined"
        } else {
            "docker-default (enforce)"
        };
        assert_eq!(label, want, "{b:#}");
    }
    assert_eq!(leftovers_of(pid), Vec::<String>::new());
}

/// A data disk for images the cache has never seen is prepared by this machine's dockerd when
/// it is the guest engine's own build (a private dockerd, `docker load` natively, then
/// `mkfs.ext4 -d`), and the guest's engine runs a container from it. Every run imports a
/// fresh image (a new id, so a new disk), which is removed afterwards with its disk.
#[test]
fn a_new_data_disk_is_prepared_natively_and_the_guest_engine_runs_from_it() {
    if !available() {
        return;
    }
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let tag = "nsmatrix-test/prep-busybox:latest";
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let tar = dir.path().join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("docker")
        .args(["import"])
        .arg(&tar)
        .arg(tag)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "docker import");
    // The running engine's default bridge, which must survive the preparation's own dockerd.
    let bridge = || {
        Command::new("ip")
            .args(["link", "show", "docker0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let had_bridge = bridge();
    let o = Command::new(bin())
        .args([
            "vm",
            "engine",
            "--kernel",
            "debian-6.1",
            "--image",
            tag,
            "--run",
            tag,
        ])
        .args(["--", "/bin/busybox", "echo", "hello-from-the-prepared-disk"])
        .current_dir(common::repo())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // Remove the image and its disk before asserting anything.
    let _ = Command::new("docker")
        .args(["rmi", "-f", tag])
        .stdout(Stdio::null())
        .status();
    let engine_dir = nsmatrix::artifacts::cache::cache_dir().join("engine");
    for e in std::fs::read_dir(&engine_dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json")
            && std::fs::read_to_string(&p).is_ok_and(|t| t.contains("nsmatrix-test/prep-busybox"))
        {
            for ext in ["ext4", "json", "lock"] {
                let _ = std::fs::remove_file(p.with_extension(ext));
            }
        }
    }
    assert!(o.status.success(), "{text}");
    assert!(text.contains("hello-from-the-prepared-disk"), "{text}");
    assert!(
        !had_bridge || bridge(),
        "the host's docker0 is gone after preparing a data disk:\n{text}"
    );
    // Natively, unless this machine's dockerd is another build than the guest's (then the
    // message says which two); root with a dockerd on PATH is what `available()` checked.
    if text.contains("in a guest of debian-6.1") {
        assert!(text.contains("this machine's dockerd is "), "{text}");
        eprintln!("this machine's dockerd is not the guest engine's build: prepared in a guest");
    } else {
        assert!(text.contains("with this machine's dockerd "), "{text}");
        assert!(text.contains("boot 0.0 s"), "{text}");
    }
}
