//! End to end on the host backend: the real binary, the real bwrap, the default matrix.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn host_ready() -> bool {
    require(is_root(), "the host backend needs root")
        && require(
            Path::new("/usr/bin/bwrap").exists(),
            "bubblewrap is installed",
        )
}

fn status_of(
    cells: &[serde_json::Value],
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<&serde_json::Value> {
    cells.iter().filter(|c| pred(c)).collect()
}

#[test]
fn default_matrix_host_part_meets_every_expectation_and_reports_agree() {
    if !host_ready() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let o = nsmatrix(&[
        "run",
        "--filter",
        "backend=host",
        "--quiet",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "run failed:\n{t}");

    let results = read_json(&out.path().join("results.json"));
    let cells = results["cells"].as_array().unwrap();
    assert!(
        cells.len() >= 20 * 30,
        "expected the host part of the default matrix, got {} cells",
        cells.len()
    );
    for c in cells {
        let st = c["status"].as_str().unwrap();
        assert!(
            st == "PASS" || st == "XFAIL",
            "{} is {st}: {}",
            c["id"],
            c["message"]
        );
    }
    let axis = |c: &serde_json::Value, k: &str| c["axes"][k].as_str().unwrap_or("").to_string();
    // The acceptance items, measured.
    for c in status_of(cells, |c| {
        axis(c, "profile") == "seccomp-deny-userns"
            && !(axis(c, "setuid") == "true" && axis(c, "argv") == "codex-legacy")
    }) {
        assert_eq!(c["signature"], "userns-denied-seccomp", "{}", c["id"]);
    }
    for c in status_of(cells, |c| {
        axis(c, "profile") == "userns-limit-0"
            && !(axis(c, "setuid") == "true" && axis(c, "argv") == "codex-legacy")
    }) {
        assert_eq!(c["signature"], "userns-limit", "{}", c["id"]);
    }
    for c in status_of(cells, |c| {
        axis(c, "profile") == "caps-docker-default" && axis(c, "setuid") == "true"
    }) {
        assert_eq!(c["signature"], "capset-denied", "{}", c["id"]);
    }
    // no-new-privileges + setuid behaves exactly like its non-setuid twin.
    let by_id: BTreeMap<String, &serde_json::Value> = cells
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c))
        .collect();
    let mut twins = 0;
    for (id, c) in &by_id {
        if axis(c, "profile") == "no-new-privileges" && axis(c, "setuid") == "true" {
            let twin = id.replace("+setuid", "");
            let t = by_id.get(&twin).unwrap_or_else(|| panic!("no twin {twin}"));
            assert_eq!(
                (&c["status"], &c["observed"]),
                (&t["status"], &t["observed"]),
                "{id} vs {twin}"
            );
            assert_eq!(c["details"]["bwrap.setuid-bit"], "true");
            assert_eq!(c["details"]["bwrap.setuid-effective"], "false");
            twins += 1;
        }
    }
    assert!(twins > 0);
    // Every PASS rests on evidence; setuid is what the probe saw in /proc: euid 0 for a
    // setuid copy run as uid 1000 without restrictions, never under no-new-privileges.
    for c in status_of(cells, |c| c["status"] == "PASS") {
        for k in ["tree", "output", "setuid", "sandbox"] {
            assert!(
                c["evidence"][k].is_string(),
                "{} has no {k} evidence",
                c["id"]
            );
        }
    }
    let setuid_seen = |profile: &str| {
        status_of(cells, |c| {
            axis(c, "profile") == profile && axis(c, "setuid") == "true"
        })
        .iter()
        .map(|c| {
            c["details"]["bwrap.setuid-observed"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect::<Vec<_>>()
    };
    let none = setuid_seen("none");
    assert!(!none.is_empty());
    for s in &none {
        assert!(s.contains("ruid 1000, euid 0 (setuid in effect)"), "{s}");
    }
    for s in setuid_seen("no-new-privileges") {
        assert!(s.contains("euid 1000 (setuid not in effect)"), "{s}");
    }
    // The userns-limit-0 profile's user namespace maps root too, so its setuid cells test
    // setuid for real: the probe saw euid 0 inside that namespace.
    let limited = setuid_seen("userns-limit-0");
    assert!(!limited.is_empty());
    for s in &limited {
        assert!(s.contains("ruid 1000, euid 0 (setuid in effect)"), "{s}");
    }

    // JUnit: strict XML, one testcase per cell, counts equal to results.json and report.md.
    let xml = std::fs::read_to_string(out.path().join("junit.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("junit.xml is well-formed XML");
    let testcases = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .count();
    assert_eq!(testcases, cells.len());
    let failures = doc
        .descendants()
        .filter(|n| n.has_tag_name("failure"))
        .count();
    let errors = doc
        .descendants()
        .filter(|n| n.has_tag_name("error"))
        .count();
    let skipped = doc
        .descendants()
        .filter(|n| n.has_tag_name("skipped"))
        .count();
    let count = |s: &str| cells.iter().filter(|c| c["status"] == s).count();
    assert_eq!(failures, count("FAIL") + count("XPASS"));
    assert_eq!(errors, count("ERROR"));
    assert_eq!(skipped, count("SKIP"));
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    let row = format!(
        "| {} | {} | {} | {} | {} | {} | {} |",
        cells.len(),
        count("PASS"),
        count("FAIL"),
        count("XFAIL"),
        count("XPASS"),
        count("ERROR"),
        count("SKIP")
    );
    assert!(md.contains(&row), "report.md lacks the totals row {row}");
    let jsonl = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), cells.len());
}

#[test]
fn malformed_matrices_exit_2_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let scen = repo().join("scenarios");
    let base = format!(
        "[[environment]]\nname = \"host\"\nbackend = \"host\"\n\n[[subject]]\nname = \"bwrap\"\nkind = \"bwrap\"\n\n[[scenarios]]\nname = \"core\"\ndir = \"{}\"\n",
        scen.display()
    );
    let cases = [
        (
            "unknown-key",
            base.replace("kind = \"bwrap\"", "kind = \"bwrap\"\nsetuidd = true"),
            "m.toml:8:1",
        ),
        (
            "bad-axis-value",
            base.replace(
                "kind = \"bwrap\"",
                "kind = \"bwrap\"\nargv = [\"codex\", \"codex-lgacy\"]",
            ),
            "m.toml:8:8",
        ),
        (
            "duplicate-id",
            format!("{base}\n[[subject]]\nname = \"bwrap\"\nkind = \"bwrap\"\n"),
            "m.toml:14:8",
        ),
        (
            "unknown profile",
            base.replace(
                "backend = \"host\"",
                "backend = \"host\"\nprofile = \"nope\"",
            ),
            "m.toml:4:11",
        ),
        // Typed environments: a guest's kernel and root filesystem are checked against the
        // catalog before anything runs, not found missing at provisioning.
        (
            "misspelt kernel",
            base.replace(
                "backend = \"host\"",
                "backend = \"qemu\"\nkernel = \"debian-6.1x\"",
            ),
            "m.toml:4:10: error[bad-axis-value]: no kernel named `debian-6.1x`",
        ),
        (
            "misspelt guest image",
            base.replace(
                "backend = \"host\"",
                "backend = \"qemu\"\nkernel = \"debian-6.1\"\nimage = \"bookwrm\"",
            ),
            "m.toml:5:9: error[bad-axis-value]: no image or root filesystem named `bookwrm`",
        ),
        // A container in an engine guest: the kernel from the catalog, the image defined.
        (
            "guest-docker misspelt kernel",
            base.replace(
                "backend = \"host\"",
                "backend = \"guest-docker\"\nkernel = \"synology-like-5.1\"\nimage = \"bookworm\"",
            ) + "\n[image.bookworm]\nrecipe = \"bookworm\"\n",
            "m.toml:4:10: error[bad-axis-value]: no kernel named `synology-like-5.1`",
        ),
        (
            "guest-docker without a kernel",
            base.replace(
                "backend = \"host\"",
                "backend = \"guest-docker\"\nimage = \"bookworm\"",
            ) + "\n[image.bookworm]\nrecipe = \"bookworm\"\n",
            "error[missing-axis]: environment `host` (guest-docker) needs `kernel`",
        ),
        (
            "guest-docker host profile",
            base.replace(
                "backend = \"host\"",
                "backend = \"guest-docker\"\nkernel = \"debian-6.1\"\nimage = \"bookworm\"\nprofile = \"deny\"",
            ) + "\n[image.bookworm]\nrecipe = \"bookworm\"\n\n[profile.deny]\nseccomp = \"deny-userns\"\n",
            "m.toml:6:11: error[profile-backend]",
        ),
    ];
    for (what, toml, at) in cases {
        let p = dir.path().join("m.toml");
        std::fs::write(&p, toml).unwrap();
        for sub in ["run", "list"] {
            let o = Command::new(bin())
                .args([sub, "--matrix", p.to_str().unwrap()])
                .output()
                .unwrap();
            let t = text(&o);
            assert_eq!(o.status.code(), Some(2), "{what}: {t}");
            assert!(t.contains(at), "{what}: expected {at} in:\n{t}");
        }
    }
}

#[test]
fn sigint_halfway_keeps_finished_cells_and_leaves_nothing_behind() {
    if !host_ready() {
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("nsmatrix-sigint")
        .tempdir_in("/var/tmp")
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let matrix = work.path().join("m.toml");
    std::fs::write(
        &matrix,
        format!(
            "[settings]\nhost-work-dir = \"{}\"\n\n[[environment]]\nname = \"host\"\nbackend = \"host\"\nprofile = [\"none\", \"no-new-privileges\"]\n\n[profile.no-new-privileges]\nno-new-privileges = true\n\n[[subject]]\nname = \"bwrap\"\nkind = \"bwrap\"\nsetuid = [true, false]\nargv = [\"codex\", \"codex-legacy\"]\n\n[[scenarios]]\nname = \"core\"\ndir = \"{}\"\n",
            work.path().join("hw").display(),
            repo().join("scenarios").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args([
            "run",
            "--quiet",
            "--jobs",
            "1",
            "--matrix",
            matrix.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let jsonl = out.path().join("results.jsonl");
    let start = Instant::now();
    // Wait until some cells are done, then interrupt.
    loop {
        let n = std::fs::read_to_string(&jsonl)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 10 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_ne!(
        status.code(),
        Some(0),
        "an interrupted run does not claim success"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is a whole result"))
        .collect();
    assert!(lines.len() >= 10);
    let total = 2
        * 4
        * std::fs::read_dir(repo().join("scenarios"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().join("patch.txt").exists())
            .count();
    assert!(
        lines.len() < total,
        "the run finished before the interrupt; make it longer"
    );
    // The reports of what finished are written.
    let results = read_json(&out.path().join("results.json"));
    assert_eq!(results["cells"].as_array().unwrap().len(), lines.len());
    assert!(results["interrupted"].is_string());
    // No run directory (workspaces, setuid copies) is left, and no sandbox process.
    let hw = work.path().join("hw");
    let left: Vec<_> = std::fs::read_dir(&hw)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let ps = Command::new("pgrep")
        .args(["-f", hw.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "stray processes: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}
