//! The GitLab CI recipe (ci-examples/gitlab/.gitlab-ci.yml) run for real: gitlab-ci-local from
//! the npm registry (scripts/gitlab-ci-local.sh) with its shell executor on this machine, on a
//! clone of the repository with a small matrix. The build job compiles nsmatrix, three `matrix`
//! shards run in parallel from the build's artifact, and the merge job combines their artifacts
//! into one run.
//!
//! Needs root, git and npm (scripts/install-packages.sh installs nodejs); skips loudly without
//! them, fails under CI.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn has(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_gitlab_recipe_runs_green_under_gitlab_ci_local() {
    if !require(
        is_root(),
        "root (the recipe's jobs run nsmatrix's host cells as root)",
    ) || !require(has("git"), "git")
        || !require(
            has("npm"),
            "npm (scripts/install-packages.sh installs nodejs)",
        )
        || !require(has("rsync"), "rsync (gitlab-ci-local's shell isolation)")
    {
        return;
    }
    let repo = repo();
    // A fixed place under target/ so that the recipe's release build is incremental.
    let project = repo.join("target/gitlab-ci-local-project");
    let _ = std::fs::remove_dir_all(&project);
    let st = Command::new("git")
        .args(["clone", "-q", "--no-hardlinks"])
        .arg(&repo)
        .arg(&project)
        .status()
        .unwrap();
    assert!(st.success(), "git clone failed");
    // The working tree's recipe and runner script, not only what is committed.
    for f in [
        "ci-examples/gitlab/.gitlab-ci.yml",
        "scripts/gitlab-ci-local.sh",
    ] {
        std::fs::copy(repo.join(f), project.join(f)).unwrap();
    }
    let o = Command::new(project.join("scripts/gitlab-ci-local.sh"))
        .arg(&project)
        .args([
            "--variable",
            "NSMATRIX_RUN_ARGS=--filter backend=host --filter kind=bwrap --filter scenario=add_file",
        ])
        .env("CARGO_TARGET_DIR", repo.join("target"))
        .output()
        .expect("scripts/gitlab-ci-local.sh runs");
    let out = text(&o);
    let tail: String = out
        .lines()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(o.status.success(), "the pipeline failed:\n{tail}");

    // Every job ran and passed: build, the three shards, merge.
    for job in [
        "build",
        "matrix: [1/3]",
        "matrix: [2/3]",
        "matrix: [3/3]",
        "merge",
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(job) && l.contains("finished in")),
            "job {job} did not finish:\n{tail}"
        );
    }
    assert!(!out.contains(" FAIL "), "a job failed:\n{tail}");

    // The shards ran in parallel: every shard started before the first one finished.
    let pos = |pat: &dyn Fn(&str) -> bool| out.lines().position(pat);
    let first_done = pos(&|l: &str| l.starts_with("matrix: [") && l.contains("finished in"))
        .expect("a shard finished");
    for k in 1..=3 {
        let started = pos(&|l: &str| l.starts_with(&format!("matrix: [{k}/3]")))
            .unwrap_or_else(|| panic!("shard {k} never started"));
        assert!(
            started < first_done,
            "shard {k} started after another finished: not parallel\n{tail}"
        );
    }

    // The artifacts reached the merge job: one merged run of the three shards' cells.
    let merged = find(&project, "reports/nightly/results.json")
        .unwrap_or_else(|| panic!("no merged results.json under {project:?}:\n{tail}"));
    let m = read_json(&merged);
    let cells = m["cells"].as_array().unwrap().len();
    assert!(cells > 0);
    let mut shard_cells = 0;
    for k in 1..=3 {
        let f = find(&project, &format!("reports/shard-{k}/results.json"))
            .unwrap_or_else(|| panic!("no artifact of shard {k}"));
        shard_cells += read_json(&f)["cells"].as_array().unwrap().len();
    }
    assert_eq!(cells, shard_cells, "the merge lost or duplicated cells");
    let junit = merged.with_file_name("junit.xml");
    assert!(
        junit.is_file(),
        "no merged junit.xml (the pipeline's test report)"
    );
}

/// `rel` in the project or in one of gitlab-ci-local's job directories / artifact stores.
fn find(project: &Path, rel: &str) -> Option<std::path::PathBuf> {
    let direct = project.join(rel);
    if direct.is_file() {
        return Some(direct);
    }
    let mut stack = vec![project.join(".gitlab-ci-local")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.join(rel).is_file() {
                return Some(p.join(rel));
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) && !p.ends_with("target") {
                stack.push(p);
            }
        }
    }
    None
}
