//! Regression tracking on real host runs: shards + merge against one unsharded run, diff and
//! `run --baseline` against a run whose `none` profile really denies user namespaces, sign-off
//! verdicts checked by hand against results.json, `--repeat`, the heat map rendered to PNG, and
//! every junit.xml read by a real consumer's parser (PyPI `junitparser`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

/// Three scenarios on every host environment and bwrap subject: 60 cells, under a second.
const FILTERS: &[&str] = &[
    "--filter",
    "backend=host",
    "--filter",
    "kind=bwrap",
    "--filter",
    "scenario={add_file,update_multiple_chunks,confine_dotdot_add}",
];

fn host_ready() -> bool {
    require(is_root(), "the host backend needs root")
        && require(
            Path::new("/usr/bin/bwrap").exists(),
            "bubblewrap is installed",
        )
}

fn run_into(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "--quiet", "--out", dir.to_str().unwrap()];
    args.extend_from_slice(FILTERS);
    args.extend_from_slice(extra);
    nsmatrix(&args)
}

/// One unsharded run shared by the tests of this file.
fn base_run() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("base");
        let o = run_into(&dir, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        (t, dir)
    })
    .1
}

fn cells(dir: &Path) -> Vec<Value> {
    read_json(&dir.join("results.json"))["cells"]
        .as_array()
        .unwrap()
        .clone()
}

/// (id, status, observed, signature) of every cell, in file order.
fn fingerprint(dir: &Path) -> Vec<(String, String, String, String)> {
    cells(dir)
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
                c["observed"].as_str().unwrap().to_string(),
                c["signature"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Parse junit.xml with junitparser and return (tests, failures, errors, skipped).
fn junitparser_counts(xml: &Path) -> Option<(usize, usize, usize, usize)> {
    if !require(
        python_has("junitparser"),
        "python3 with the junitparser package (scripts/test.sh installs it)",
    ) {
        return None;
    }
    let script = r#"
import sys
from junitparser import JUnitXml, Failure, Error, Skipped
xml = JUnitXml.fromfile(sys.argv[1])
t = f = e = s = 0
for suite in xml:
    for case in suite:
        t += 1
        for r in case.result:
            if isinstance(r, Failure): f += 1
            elif isinstance(r, Error): e += 1
            elif isinstance(r, Skipped): s += 1
print(t, f, e, s)
"#;
    let o = Command::new("python3")
        .args(["-c", script, xml.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "junitparser rejected {}: {}",
        xml.display(),
        text(&o)
    );
    let v: Vec<usize> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    Some((v[0], v[1], v[2], v[3]))
}

fn status_counts(dir: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in cells(dir) {
        *m.entry(c["status"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

fn check_junit(dir: &Path) {
    let Some((t, f, e, s)) = junitparser_counts(&dir.join("junit.xml")) else {
        return;
    };
    let c = status_counts(dir);
    let n = |k: &str| c.get(k).copied().unwrap_or(0);
    assert_eq!(t, cells(dir).len(), "{}", dir.display());
    assert_eq!(f, n("FAIL") + n("XPASS"));
    assert_eq!(e, n("ERROR"));
    assert_eq!(s, n("SKIP"));
}

#[test]
fn three_shards_merge_into_the_unsharded_run() {
    if !host_ready() {
        return;
    }
    let base = base_run();
    let t = tempfile::tempdir().unwrap();
    let mut shard_dirs = Vec::new();
    let mut envs_seen: BTreeMap<String, usize> = BTreeMap::new();
    for k in 1..=3 {
        let d = t.path().join(format!("shard-{k}"));
        let o = run_into(&d, &["--shard", &format!("{k}/3")]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let shard = read_json(&d.join("results.json"))["shard"].clone();
        assert_eq!(shard["index"], k);
        assert_eq!(shard["count"], 3);
        // A batch never splits: each environment is in exactly one shard.
        let mut envs: Vec<String> = cells(&d)
            .iter()
            .map(|c| c["environment"].as_str().unwrap().to_string())
            .collect();
        envs.dedup();
        envs.sort();
        envs.dedup();
        assert!(!envs.is_empty(), "shard {k}/3 got no batch");
        for e in envs {
            *envs_seen.entry(e).or_default() += 1;
        }
        shard_dirs.push(d);
    }
    assert!(envs_seen.values().all(|n| *n == 1), "{envs_seen:?}");
    // Every environment of the unsharded run is in one shard.
    let mut base_envs: Vec<String> = cells(base_run())
        .iter()
        .map(|c| c["environment"].as_str().unwrap().to_string())
        .collect();
    base_envs.sort();
    base_envs.dedup();
    assert_eq!(envs_seen.keys().cloned().collect::<Vec<_>>(), base_envs);

    let merged = t.path().join("merged");
    let mut args = vec!["merge", "--out", merged.to_str().unwrap()];
    // Any order of inputs gives the same result.
    for d in shard_dirs.iter().rev() {
        args.push(d.to_str().unwrap());
    }
    let o = nsmatrix(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fingerprint(&merged), fingerprint(base));
    assert_eq!(status_counts(&merged), status_counts(base));
    for f in ["junit.xml", "report.md", "heatmap.svg", "results.jsonl"] {
        assert!(merged.join(f).is_file(), "merge wrote no {f}");
    }
    assert_eq!(
        std::fs::read_to_string(merged.join("results.jsonl"))
            .unwrap()
            .lines()
            .count(),
        cells(base).len()
    );
    // The report's grids and sections match, times aside (and the schedule: each shard's
    // timeline is its own; a merged run has none).
    assert!(!merged.join("timeline.svg").exists());
    let strip_times = |p: &Path| {
        let text = std::fs::read_to_string(p).unwrap();
        let text = match text.find("## Where the time went") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        text.lines()
            .filter(|l| !l.starts_with("# nsmatrix run") && !l.starts_with("Matrix `"))
            .map(|l| {
                // "(0.12 s)" → "(s)"
                let mut out = String::new();
                let mut rest = l;
                while let Some(i) = rest.find(" (") {
                    out.push_str(&rest[..i]);
                    let after = &rest[i + 2..];
                    match after.find(" s)") {
                        Some(j) if after[..j].parse::<f64>().is_ok() => {
                            out.push_str(" (s)");
                            rest = &after[j + 3..];
                        }
                        _ => {
                            out.push_str(" (");
                            rest = after;
                        }
                    }
                }
                out.push_str(rest);
                out
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip_times(&merged.join("report.md")),
        strip_times(&base.join("report.md"))
    );
    check_junit(base);
    check_junit(&merged);

    // A missing shard is refused, naming it.
    let o = nsmatrix(&[
        "merge",
        "--out",
        t.path().join("bad").to_str().unwrap(),
        shard_dirs[0].to_str().unwrap(),
        shard_dirs[2].to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("shard(s) 2 of 3 missing"), "{}", text(&o));
}

/// The default matrix with its `none` profile given nsmatrix's deny-userns seccomp filter: the
/// host changed under the matrix, as when a kernel or runtime update lands.
fn regressed_matrix(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("matrix.toml")).unwrap();
    let needle = "[profile.none]\n";
    assert!(text.contains(needle));
    let text = text
        .replace(needle, "[profile.none]\nseccomp = \"deny-userns\"\n")
        .replace(
            "dir = \"scenarios\"",
            &format!("dir = {:?}", repo().join("scenarios").display().to_string()),
        );
    let p = dir.join("matrix.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn diff_and_baseline_report_a_real_regression_and_the_heat_map_shows_it() {
    if !host_ready() {
        return;
    }
    let base = base_run();
    let t = tempfile::tempdir().unwrap();
    let matrix = regressed_matrix(t.path());
    let new = t.path().join("new");
    let o = run_into(
        &new,
        &[
            "--matrix",
            matrix.to_str().unwrap(),
            "--baseline",
            base.to_str().unwrap(),
        ],
    );
    // Cells expected to pass now fail: the run itself exits 1.
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // What the diff must find, computed by hand from the two results.json files.
    let before: BTreeMap<String, Value> = cells(base)
        .into_iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c))
        .collect();
    let mut want: Vec<String> = Vec::new();
    for c in cells(&new) {
        let b = &before[c["id"].as_str().unwrap()];
        let ok = |s: &Value| s == "PASS" || s == "XFAIL";
        let bad = |s: &Value| s == "FAIL" || s == "XPASS" || s == "ERROR";
        if ok(&b["status"]) && bad(&c["status"]) {
            want.push(c["id"].as_str().unwrap().to_string());
        }
    }
    want.sort();
    // host-none, every subject but the setuid bwrap with the legacy argv (needs no userns).
    assert_eq!(want.len(), 9, "{want:?}");
    assert!(want.iter().all(|id| id.starts_with("host-none/")));

    let o = nsmatrix(&[
        "diff",
        base.to_str().unwrap(),
        new.join("results.json").to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut got: Vec<String> = d["regressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want);
    for c in d["regressions"].as_array().unwrap() {
        // The member the observed seccomp filter singles out of the userns-denied family.
        assert_eq!(c["new"]["observed"], "userns-denied-seccomp");
    }
    assert_eq!(d["added"].as_array().unwrap().len(), 0);
    assert_eq!(d["removed"].as_array().unwrap().len(), 0);
    assert!(
        d["timing"]["method"]
            .as_str()
            .unwrap()
            .contains("noise band")
    );

    // The diff against itself finds nothing and exits 0.
    let o = nsmatrix(&["diff", base.to_str().unwrap(), base.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("No regression."));

    // run --baseline: the same section at the top of report.md, and diff.json beside it.
    let md = std::fs::read_to_string(new.join("report.md")).unwrap();
    let mut lines = md.lines().filter(|l| !l.is_empty());
    assert!(lines.next().unwrap().starts_with("# nsmatrix run"));
    // Coverage first (what did not run), then the changes against the baseline.
    assert!(lines.next().unwrap().starts_with("## Coverage"));
    assert!(
        lines
            .find(|l| l.starts_with("## "))
            .unwrap()
            .starts_with("## Changes against baseline")
    );
    assert!(md.contains("**9 regressed**"), "{md}");
    assert!(md.contains("![heat map"));
    let dj = read_json(&new.join("diff.json"));
    assert_eq!(dj["regressions"].as_array().unwrap().len(), 9);
    check_junit(&new);

    heat_map_renders(&new);
}

/// Convert heatmap.svg to PNG and check its size and the colour of tiles found in the SVG.
fn heat_map_renders(run: &Path) {
    if !require(
        Command::new("rsvg-convert")
            .arg("--version")
            .output()
            .is_ok(),
        "rsvg-convert (Debian librsvg2-bin; scripts/test.sh installs it)",
    ) {
        return;
    }
    let svg_path = run.join("heatmap.svg");
    let png_path = run.join("heatmap.png");
    let o = Command::new("rsvg-convert")
        .args([svg_path.to_str().unwrap(), "-o", png_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "rsvg-convert: {}", text(&o));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let root = doc.root_element();
    let w: u32 = root.attribute("width").unwrap().parse().unwrap();
    let h: u32 = root.attribute("height").unwrap().parse().unwrap();

    let decoder = png::Decoder::new(std::fs::File::open(&png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (w, h));
    assert!(w > 300 && h > 150, "{w}x{h}");
    let channels = info.color_type.samples();
    let pixel = |x: u32, y: u32| {
        let i = (y as usize * info.width as usize + x as usize) * channels;
        (buf[i], buf[i + 1], buf[i + 2])
    };
    let hex = |s: &str| {
        let v = u32::from_str_radix(s.trim_start_matches('#'), 16).unwrap();
        ((v >> 16) as u8, (v >> 8) as u8, v as u8)
    };
    let tile = |env: &str, subject: &str| {
        let g = doc
            .descendants()
            .find(|n| {
                n.attribute("data-environment") == Some(env)
                    && n.attribute("data-subject") == Some(subject)
            })
            .unwrap_or_else(|| panic!("no tile {env} × {subject}"));
        let r = g.children().find(|n| n.has_tag_name("rect")).unwrap();
        let num = |a: &str| r.attribute(a).unwrap().parse::<f64>().unwrap();
        let (x, y) = (
            num("x") + num("width") / 2.0,
            num("y") + num("height") / 2.0,
        );
        (
            g.attribute("data-status").unwrap().to_string(),
            g.attribute("data-changed").unwrap() == "true",
            pixel(x as u32, y as u32),
        )
    };
    let cases = [
        // Regressed: FAIL (red), outlined as changed.
        ("host-none", "bwrap-system+codex", "FAIL", true, "#cf222e"),
        // Still passes under the filter: unchanged PASS (green).
        (
            "host-none",
            "bwrap-system+setuid+codex-legacy",
            "PASS",
            false,
            "#2da44e",
        ),
        // Expected failure, as before (amber).
        (
            "host-userns-limit-0",
            "bwrap-system+codex",
            "XFAIL",
            false,
            "#e3b341",
        ),
    ];
    for (env, subject, status, changed, colour) in cases {
        let (s, c, px) = tile(env, subject);
        assert_eq!((s.as_str(), c), (status, changed), "{env} × {subject}");
        assert_eq!(px, hex(colour), "{env} × {subject} pixel");
    }
    // The white background and the black change mark exist in the picture.
    assert_eq!(pixel(1, 1), (255, 255, 255));
}

fn signoff_json(run: &Path, axis: &str, from: &str, to: &str) -> (Option<i32>, Value) {
    let o = nsmatrix(&[
        "signoff",
        "--axis",
        axis,
        "--from",
        from,
        "--to",
        to,
        "--format",
        "json",
        run.to_str().unwrap(),
    ]);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("signoff printed no JSON ({e}): {}", text(&o)));
    (o.status.code(), v)
}

#[test]
fn signoff_verdicts_agree_with_a_hand_count() {
    if !host_ready() {
        return;
    }
    let base = base_run();
    // setuid false → true: pair by id as a person would (the subject gains "+setuid").
    let by_id: BTreeMap<String, Value> = cells(base)
        .into_iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c))
        .collect();
    let mut hand: BTreeMap<&str, usize> = BTreeMap::new();
    let mut broken_envs = Vec::new();
    // Every environment has its setuid twins (userns-limit-0's namespace maps root too).
    let mut unpaired = 0;
    for (id, c) in &by_id {
        if c["axes"]["setuid"] != "false" {
            continue;
        }
        let Some(twin) = by_id.get(&id.replacen("bwrap-system+", "bwrap-system+setuid+", 1)) else {
            unpaired += 1;
            continue;
        };
        let kind = match (c["observed"] == "pass", twin["observed"] == "pass") {
            (false, true) => "fixed",
            (true, false) => "broken",
            (true, true) => "unchanged-pass",
            (false, false) => "unchanged-fail",
        };
        if kind == "broken" {
            broken_envs.push(c["environment"].as_str().unwrap().to_string());
        }
        *hand.entry(kind).or_default() += 1;
    }
    let (code, s) = signoff_json(base, "setuid", "false", "true");
    assert_eq!(code, Some(1), "{s}");
    assert_eq!(s["verdict"], "do-not-ship");
    assert_eq!(unpaired, 0);
    assert_eq!(s["unpaired-from"], unpaired, "{s}");
    for (k, n) in &hand {
        assert_eq!(s["counts"][*k], *n, "{k}");
    }
    broken_envs.dedup();
    assert_eq!(broken_envs, ["host-caps-docker-default"]);
    assert!(
        s["verdict-line"]
            .as_str()
            .unwrap()
            .contains("host-caps-docker-default")
    );
    assert_eq!(s["remaining-failures"]["capset-denied"], 6);

    // Lifting Docker's capability bounding set fixes and breaks nothing else: ship.
    let (code, s) = signoff_json(base, "profile", "caps-docker-default", "none");
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(s["verdict"], "ship");
    assert_eq!(s["counts"]["fixed"], 6);
    assert!(s["counts"].get("broken").is_none());

    // Bad input names what exists.
    let o = nsmatrix(&[
        "signoff",
        "--axis",
        "image",
        "--from",
        "bookworm",
        "--to",
        "bookworm-suid",
        base.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("its axes are"), "{}", text(&o));
}

#[test]
fn repeat_runs_every_cell_n_times() {
    if !host_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("rep");
    let o = nsmatrix(&[
        "run",
        "--quiet",
        "--out",
        d.to_str().unwrap(),
        "--filter",
        "backend=host",
        "--filter",
        "profile={none,userns-limit-0}",
        "--filter",
        "scenario=add_file",
        "--filter",
        "kind=bwrap",
        "--repeat",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = read_json(&d.join("results.json"));
    assert_eq!(r["repeat"], 3);
    let cs = r["cells"].as_array().unwrap();
    // 4 subjects under `none` and under userns-limit-0.
    assert_eq!(cs.len(), 8);
    for c in cs {
        let reps = c["repeats"].as_array().unwrap();
        assert_eq!(
            reps.iter()
                .map(|x| x["repeat"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let differs = reps.iter().any(|x| x["status"] != reps[0]["status"]);
        assert_eq!(
            c["flaky"].as_bool().unwrap_or(false),
            differs,
            "{}",
            c["id"]
        );
    }
    // Every repeat is in the log of the run.
    assert_eq!(
        std::fs::read_to_string(d.join("results.jsonl"))
            .unwrap()
            .lines()
            .count(),
        24
    );
    check_junit(&d);
}
