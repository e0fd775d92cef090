//! A sandbox nested in a sandbox and a hardened systemd service's /proc, end to end: the real
//! binary runs the default matrix's cells of those profiles on the host and in debian-6.12
//! guests, every expectation must be met, and each failure must carry the measured message,
//! signature and the nesting the agent observed in /proc.

mod common;

use std::path::Path;

use common::*;

/// Run the default matrix's cells selected by `filters` (the `add_file` scenario), requiring
/// `backend` to really run; every cell must meet its expectation. Returns the cells.
fn run_cells(backend: &str, filters: &[&str]) -> Vec<serde_json::Value> {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec![
        "run",
        "--quiet",
        "--require",
        backend,
        "--filter",
        "scenario=add_file",
        "--out",
        out.path().to_str().unwrap(),
    ];
    for f in filters {
        args.extend(["--filter", f]);
    }
    let o = nsmatrix(&args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "run failed:\n{t}");
    let results = read_json(&out.path().join("results.json"));
    let cells = results["cells"].as_array().unwrap().clone();
    for c in &cells {
        let st = c["status"].as_str().unwrap();
        assert!(
            st == "PASS" || st == "XFAIL",
            "{} is {st}: {}",
            c["id"],
            c["message"]
        );
    }
    cells
}

fn axis(c: &serde_json::Value, k: &str) -> String {
    c["axes"][k].as_str().unwrap_or("").to_string()
}

fn s<'a>(c: &'a serde_json::Value, k: &str) -> &'a str {
    c[k].as_str().unwrap_or("")
}

/// What the agent saw of the nesting: `details."nesting.observed"`.
fn nesting(c: &serde_json::Value) -> &str {
    c["details"]["nesting.observed"].as_str().unwrap_or("")
}

/// The cells of `profile`, at least `min` of them.
fn of<'a>(cells: &'a [serde_json::Value], profile: &str, min: usize) -> Vec<&'a serde_json::Value> {
    let v: Vec<_> = cells
        .iter()
        .filter(|c| axis(c, "profile") == profile)
        .collect();
    assert!(v.len() >= min, "{profile}: {} cells, want {min}+", v.len());
    v
}

fn assert_failed(c: &serde_json::Value, signature: &str, message: &str) {
    assert_eq!(s(c, "status"), "XFAIL", "{}", c["id"]);
    assert_eq!(s(c, "signature"), signature, "{}", c["id"]);
    assert!(
        s(c, "message").contains(message),
        "{}: message {:?} lacks {message:?}",
        c["id"],
        s(c, "message")
    );
    assert!(
        c["remedy"].as_str().is_some_and(|r| !r.is_empty()),
        "{} has no remedy",
        c["id"]
    );
}

#[test]
fn host_nested_and_hardened_cells_give_the_measured_signatures_and_evidence() {
    if !require(is_root(), "the host backend needs root")
        || !require(
            Path::new("/usr/bin/bwrap").exists(),
            "bubblewrap is installed",
        )
    {
        return;
    }
    let cells = run_cells(
        "host",
        &[
            "backend=host",
            "profile={nested-*,userns-depth-*,systemd-*}",
        ],
    );
    // Inside an outer bwrap with its own user namespace: one level down, under the outer
    // bwrap seen in /proc, and everything passes (Codex's witness inside its own bwrap).
    for c in of(&cells, "nested-bwrap", 5) {
        assert_eq!(s(c, "status"), "PASS", "{}", c["id"]);
        let ev = c["evidence"]["nesting"].as_str().unwrap_or("");
        assert!(
            ev.contains("starts 1 user namespace(s) below the agent's")
                && ev.contains("the outer sandbox"),
            "{}: {ev}",
            c["id"]
        );
        if axis(c, "kind") == "codex" {
            let sb = c["evidence"]["sandbox"].as_str().unwrap_or("");
            assert!(sb.contains("bwrap") && sb.contains("user"), "{sb}");
        }
    }
    for c in of(&cells, "nested-bwrap-disable-userns", 5) {
        assert_disabled_by_the_outer_bwrap(c);
    }
    for c in of(&cells, "userns-depth-32", 5) {
        assert!(
            nesting(c).contains("starts 32 user namespace(s)"),
            "{}",
            nesting(c)
        );
        if axis(c, "argv") == "codex-legacy" {
            assert_eq!(s(c, "status"), "PASS", "{}", c["id"]);
        } else {
            assert_failed(
                c,
                "userns-nesting-limit",
                "bwrap: unshare user ns: No space left on device",
            );
        }
    }
    for c in of(&cells, "userns-depth-33", 5) {
        assert!(
            nesting(c).contains("starts 33 user namespace(s)"),
            "{}",
            nesting(c)
        );
        assert_failed(
            c,
            "userns-nesting-limit",
            "bwrap: Creating new namespace failed: nesting depth",
        );
    }
    for c in of(&cells, "systemd-protect-kernel-tunables", 5) {
        if axis(c, "kind") == "codex"
            || (axis(c, "setuid") == "true" && axis(c, "argv") == "codex-legacy")
        {
            assert_eq!(s(c, "status"), "PASS", "{}", c["id"]);
        } else {
            assert_failed(
                c,
                "proc-mount-denied",
                "bwrap: Can't mount proc on /newroot/proc: Operation not permitted",
            );
        }
    }
    for c in of(&cells, "systemd-protect-proc-invisible", 5) {
        assert_eq!(s(c, "status"), "PASS", "{}", c["id"]);
    }
    for p in ["systemd-proc-subset-pid", "systemd-hardened"] {
        for c in of(&cells, p, 5) {
            assert_failed(
                c,
                "proc-sys-unreadable",
                "bwrap: Can't read /proc/sys/kernel/overflowuid: No such file or directory",
            );
        }
    }
}

#[test]
fn guest_nested_and_hardened_cells_give_the_measured_signatures_and_evidence() {
    let qemu = [
        "/usr/bin/qemu-system-x86_64",
        "/usr/local/bin/qemu-system-x86_64",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    if !require(is_root(), "the qemu backend's cells here need root")
        || !require(qemu, "qemu-system-x86_64 is installed")
    {
        return;
    }
    let cells = run_cells("qemu", &["environment=qemu-restricted"]);
    for c in &cells {
        assert_eq!(axis(c, "kernel"), "debian-6.12", "{}", c["id"]);
    }
    let plain = |c: &&serde_json::Value| axis(c, "setuid") != "true";
    for c in of(&cells, "nested-bwrap-disable-userns", 5) {
        assert_disabled_by_the_outer_bwrap(c);
    }
    for c in of(&cells, "userns-depth-33", 5) {
        assert_failed(c, "userns-nesting-limit", "nesting depth");
        assert!(
            nesting(c).contains("starts 33 user namespace(s)"),
            "{}",
            nesting(c)
        );
    }
    for c in of(&cells, "systemd-protect-kernel-tunables", 5)
        .into_iter()
        .filter(plain)
    {
        if axis(c, "kind") == "codex" {
            assert_eq!(s(c, "status"), "PASS", "{}", c["id"]);
        } else {
            // bubblewrap 0.12.0's wording.
            assert_failed(
                c,
                "proc-mount-denied",
                "bwrap: Can't mount proc on /proc: Operation not permitted",
            );
        }
    }
    for c in of(&cells, "systemd-proc-subset-pid", 5)
        .into_iter()
        .filter(plain)
    {
        assert_failed(
            c,
            "proc-sys-unreadable",
            "bwrap: Can't read /proc/sys/kernel/overflowuid: No such file or directory",
        );
    }
}

/// Under an outer bwrap with `--disable-userns`: ENOSPC, two user namespaces down under that
/// outer bwrap, as seen in /proc.
fn assert_disabled_by_the_outer_bwrap(c: &serde_json::Value) {
    assert_failed(
        c,
        "userns-disabled-outer",
        "nesting depth or /proc/sys/user/max_*_namespaces exceeded (ENOSPC)",
    );
    assert!(
        nesting(c).contains("starts 2 user namespace(s)")
            && nesting(c).contains("--disable-userns"),
        "{}: {}",
        c["id"],
        nesting(c)
    );
}
