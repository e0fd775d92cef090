//! The scheduler on real guests: two one-vCPU QEMU guests run side by side on two job slots,
//! a memory budget for one guest runs them one after the other, and every run's timeline
//! (results.json, timeline.svg, report.md) shows which slot held which batch. No timing is
//! asserted: only which batches overlapped. Without qemu these tests fail when `CI` is set
//! and are skipped loudly otherwise.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// Two guests of the default matrix (nouserns-6.1 × two sysctl sets), a few cells each.
const FILTERS: [&str; 6] = [
    "--filter",
    "backend=qemu",
    "--filter",
    "kernel=nouserns-6.1",
    "--filter",
    "scenario=add_file",
];

fn have_qemu() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").exists()));
    require(found, "qemu-system-x86_64 on PATH")
}

/// Run the two guests at `--jobs 2`, with `memory_mb` as the budget when given; the spans.
fn run(name: &str, memory_mb: Option<&str>) -> (Vec<Value>, std::path::PathBuf) {
    let out = std::env::temp_dir().join(format!("nsmatrix-schedule-e2e-{name}"));
    let _ = std::fs::remove_dir_all(&out);
    let mut cmd = Command::new(bin());
    cmd.current_dir(repo())
        .args(["run", "--quiet", "--jobs", "2", "--out"])
        .arg(&out)
        .args(FILTERS);
    match memory_mb {
        Some(m) => cmd.env("NSMATRIX_MEMORY_MB", m),
        None => cmd.env_remove("NSMATRIX_MEMORY_MB"),
    };
    let o = cmd.output().expect("nsmatrix runs");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = read_json(&out.join("results.json"));
    let t = &r["timeline"];
    assert_eq!(t["jobs"], 2);
    let spans = t["spans"].as_array().expect("timeline spans").clone();
    assert_eq!(spans.len(), 2, "two guests: {t}");
    for s in &spans {
        assert_eq!(s["backend"], "qemu");
        assert_eq!(
            s["lanes"].as_array().map(Vec::len),
            Some(1),
            "one vCPU, one slot: {s}"
        );
        assert!(
            s["memory-mb"].as_u64().unwrap() >= 512,
            "a guest's RAM counts: {s}"
        );
        let stages: Vec<&str> = s["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|st| st["stage"].as_str().unwrap())
            .collect();
        assert_eq!(stages, ["provision", "start", "run", "teardown"], "{s}");
    }
    (spans, out)
}

fn overlap(a: &Value, b: &Value) -> bool {
    let t = |s: &Value, k: &str| s[k].as_u64().unwrap();
    t(a, "start-ms") < t(b, "end-ms") && t(b, "start-ms") < t(a, "end-ms")
}

#[test]
fn two_guests_run_side_by_side_on_two_slots() {
    if !have_qemu() {
        return;
    }
    let (spans, out) = run("side-by-side", None);
    let lanes: Vec<u64> = spans
        .iter()
        .map(|s| s["lanes"][0].as_u64().unwrap())
        .collect();
    assert_eq!(lanes, [0, 1], "each guest on its own slot");
    assert!(
        overlap(&spans[0], &spans[1]),
        "the guests ran at once: {spans:?}"
    );

    let svg = std::fs::read_to_string(out.join("timeline.svg")).expect("timeline.svg");
    assert!(svg.contains(">slot 1<") && svg.contains(">slot 2<"));
    for s in &spans {
        assert!(svg.contains(s["batch"].as_str().unwrap()), "{svg}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Where the time went"), "{md}");
    assert!(
        md.contains("](timeline.svg)"),
        "report.md links the timeline"
    );
}

#[test]
fn memory_for_one_guest_runs_them_one_after_the_other() {
    if !have_qemu() {
        return;
    }
    // 700 MiB: one guest (512 MiB RAM + QEMU's own) fits, two do not.
    let (spans, _) = run("one-by-one", Some("700"));
    assert!(!overlap(&spans[0], &spans[1]), "never at once: {spans:?}");
}
