//! A second Ctrl-C stops waiting and removes everything the run created: its containers
//! (found by the run's label), its host run directory and its guests' directories, and the
//! run exits 3. Needs root and a running Docker engine (the name says so).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn docker_up() -> bool {
    Command::new("docker")
        .arg("info")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The `nsmatrix.run` labels of every container (any state) whose run id ends with `-<pid>`.
fn containers_of(pid: u32) -> Vec<String> {
    let o = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=nsmatrix.run",
            "--format",
            "{{.ID}} {{.Label \"nsmatrix.run\"}}",
        ])
        .output()
        .expect("docker ps runs");
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.ends_with(&format!("-{pid}")))
        .map(str::to_string)
        .collect()
}

fn sigint(pid: u32) {
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
}

#[test]
fn second_ctrl_c_removes_containers_and_batch_dirs_needs_root_and_docker() {
    if !require(is_root() && docker_up(), "root and a running Docker engine") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args([
            "run",
            "--filter",
            "backend={host,docker}",
            "--jobs",
            "2",
            "--quiet",
            "--out",
            out.path().to_str().unwrap(),
        ])
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nsmatrix starts");
    let pid = child.id();
    // Every stdout line, as it comes (the run's notes go there with --quiet).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    // Wait until the run has containers of its own: then there is something to remove.
    let start = Instant::now();
    let mut run_id = None;
    while start.elapsed() < Duration::from_secs(300) {
        if let Some(l) = containers_of(pid).first() {
            run_id = l.split_once(' ').map(|(_, r)| r.to_string());
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(run_id) = run_id else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the run never had a container:\n{}{}",
            reader.join().unwrap(),
            err_reader.join().unwrap()
        );
    };
    let host_dir = Path::new("/var/tmp/nsmatrix").join(&run_id);
    sigint(pid);
    // The second Ctrl-C as soon as the run says it is stopping (its batches are still
    // cleaning up then), not after a fixed delay that a fast clean-up can outrun.
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if line.contains("interrupted;") {
            break;
        }
    }
    sigint(pid);
    let status = child.wait().unwrap();
    let o = std::process::Output {
        status,
        stdout: reader.join().unwrap().into_bytes(),
        stderr: err_reader.join().unwrap().into_bytes(),
    };
    let t = text(&o);
    assert_eq!(o.status.code(), Some(3), "exit code after two Ctrl-C:\n{t}");
    assert!(t.contains("second Ctrl-C"), "{t}");
    assert_eq!(
        containers_of(pid),
        Vec::<String>::new(),
        "containers of run {run_id} left:\n{t}"
    );
    assert!(!host_dir.exists(), "{} left", host_dir.display());
    let guests = std::env::temp_dir().join("nsmatrix-qemu");
    if let Ok(rd) = std::fs::read_dir(&guests) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(&format!("-{pid}")), "guest dir {name} left");
        }
    }
    // What finished before the interrupt is reported, and the run says it was interrupted.
    let results = read_json(&out.path().join("results.json"));
    assert_eq!(results["interrupted"], "interrupted by Ctrl-C", "{t}");
}
