//! Cells side by side in a guest with two vCPUs: the same cells in a one-vCPU guest and in a
//! two-vCPU guest of debian-6.1, under the default sysctls and under `max-userns-0`, must come
//! out the same (status, signature), and the two-vCPU guests must really have run cells at
//! once (a cell started while another was running, as the agent's own events show). Without
//! qemu these tests fail when `CI` is set (see tests/common) and are skipped loudly otherwise.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Scenarios of every kind: ordinary patches, failing ones, confinement ones (one writes an
/// absolute path, so it runs alone).
const SCENARIOS: &str = r#"["add_file", "delete_file", "update_multiple_chunks", "invalid_hunk_header", "move_into_new_directory", "confine_dotdot_add", "confine_symlink_dir_update", "confine_absolute_add"]"#;

fn have_qemu() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").exists()));
    require(found, "qemu-system-x86_64 on PATH")
}

fn matrix() -> String {
    format!(
        r#"[settings]
require = ["qemu"]

[sysctl-set.max-userns-0]
"user.max_user_namespaces" = "0"

[[environment]]
name = "par"
backend = "qemu"
kernel = "debian-6.1"
sysctl = ["default", "max-userns-0"]
vcpus = [1, 2]

[[subject]]
name = "bwrap"
kind = "bwrap"
build = "system"
setuid = [true, false]
argv = ["codex", "codex-legacy"]

[[scenarios]]
name = "some"
dir = "{}"
only = {SCENARIOS}
"#,
        repo().join("scenarios").display()
    )
}

/// The cell id with the environment's vCPU label taken out, so twins share a key.
fn twin_key(id: &str) -> String {
    id.replace("-1cpu/", "/").replace("-2cpu/", "/")
}

#[test]
fn two_vcpus_run_cells_side_by_side_with_the_results_of_one() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("matrix.toml");
    std::fs::write(&m, matrix()).unwrap();
    let out = dir.path().join("out");
    let o = Command::new(bin())
        .current_dir(repo())
        .args(["run", "--quiet", "--jobs", "2", "--matrix"])
        .arg(&m)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let r = read_json(&out.join("results.json"));
    let cells = r["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 4 * 4 * 8, "{}", text(&o));

    // Status and signature of every cell, per vCPU count.
    let mut by: [BTreeMap<String, (String, String)>; 2] = Default::default();
    for c in cells {
        let id = c["id"].as_str().unwrap();
        let status = c["status"].as_str().unwrap().to_string();
        assert_ne!(status, "ERROR", "{id}: {c}");
        assert_ne!(status, "SKIP", "{id}: {c}");
        let sig = c["signature"].as_str().unwrap_or_default().to_string();
        let k = if id.contains("-2cpu/") { 1 } else { 0 };
        by[k].insert(twin_key(id), (status, sig));
    }
    assert_eq!(by[0].len(), 64);
    assert_eq!(
        by[0], by[1],
        "one vCPU (left) and two side by side (right) disagree"
    );
    // The comparison has both outcomes in it: max-userns-0 refuses the unprivileged bwrap.
    let sigs: Vec<&str> = by[0].values().map(|(_, s)| s.as_str()).collect();
    assert!(sigs.contains(&""), "{sigs:?}");
    assert!(sigs.iter().any(|s| s.starts_with("userns-")), "{sigs:?}");

    // The two-vCPU guests ran cells at once; the one-vCPU guests never did.
    for set in ["default", "max-userns-0"] {
        for (cpus, want) in [(1, false), (2, true)] {
            let log = out.join(format!("logs/par-{set}-{cpus}cpu/agent.jsonl"));
            let events: Vec<Value> = std::fs::read_to_string(&log)
                .unwrap_or_else(|e| panic!("{}: {e}", log.display()))
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let (mut running, mut most) = (0, 0);
            for e in &events {
                match e["event"].as_str() {
                    Some("cell-started") => running += 1,
                    Some("cell-finished") => running -= 1,
                    _ => {}
                }
                most = most.max(running);
            }
            assert_eq!(
                most > 1,
                want,
                "{set}, {cpus} vCPU(s): at most {most} at once"
            );
            let said = events.iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("side by side"))
            });
            assert_eq!(said, want, "{set}, {cpus} vCPU(s)");
        }
    }
    // The cell that writes an absolute path ran alone, before the others.
    let log = std::fs::read_to_string(out.join("logs/par-default-2cpu/agent.jsonl")).unwrap();
    let first = log
        .lines()
        .find(|l| l.contains("\"cell-started\""))
        .unwrap();
    assert!(first.contains("confine_absolute_add"), "{first}");
}
