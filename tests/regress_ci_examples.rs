//! The CI recipes in ci-examples/ are valid for their engines: checked against the GitHub
//! workflow and GitLab CI schemas that the PyPI package `check-jsonschema` vendors (offline),
//! and a broken copy of each is rejected, so the check is known to bite.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn validator() -> bool {
    require(
        Command::new("check-jsonschema")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "check-jsonschema (PyPI; scripts/test.sh installs it)",
    )
}

fn check(schema: &str, file: &Path) -> std::process::Output {
    Command::new("check-jsonschema")
        .args(["--builtin-schema", schema, file.to_str().unwrap()])
        .output()
        .expect("check-jsonschema runs")
}

fn valid_and_a_broken_copy_is_not(schema: &str, rel: &str, break_it: (&str, &str)) {
    let file = repo().join(rel);
    let o = check(schema, &file);
    assert!(o.status.success(), "{rel} is not valid:\n{}", text(&o));

    let body = std::fs::read_to_string(&file).unwrap();
    assert!(
        body.contains(break_it.0),
        "{rel} no longer contains {:?}",
        break_it.0
    );
    let t = tempfile::tempdir().unwrap();
    let bad = t.path().join(file.file_name().unwrap());
    std::fs::write(&bad, body.replacen(break_it.0, break_it.1, 1)).unwrap();
    let o = check(schema, &bad);
    assert!(
        !o.status.success(),
        "a broken {rel} passed the schema check"
    );

    // The recipes name the packages a runner needs and use the sharding and merge commands.
    for needle in [
        "bubblewrap",
        "qemu-system-x86",
        "debootstrap",
        "--shard",
        "nsmatrix merge",
        "junit.xml",
        "--baseline",
        "--require host,docker,qemu",
        "lost-coverage",
    ] {
        let needle = needle.replace("nsmatrix merge", "merge");
        assert!(body.contains(&needle), "{rel} does not mention {needle}");
    }
}

#[test]
fn github_actions_workflow_is_valid() {
    if !validator() {
        return;
    }
    valid_and_a_broken_copy_is_not(
        "vendor.github-workflows",
        "ci-examples/github/nsmatrix-nightly.yml",
        (
            "    runs-on: ubuntu-24.04\n",
            "    runs-on: ubuntu-24.04\n    run-on-sundays: true\n",
        ),
    );
}

#[test]
fn gitlab_ci_is_valid() {
    if !validator() {
        return;
    }
    valid_and_a_broken_copy_is_not(
        "vendor.gitlab-ci",
        "ci-examples/gitlab/.gitlab-ci.yml",
        ("  parallel: 3\n", "  parallel: lots\n"),
    );
}

/// One gate for every test that needs a real backend: CI means `CI` is set and not empty,
/// `false` or `0`, so `CI=1` cannot make a heavy test pass vacuously.
#[test]
fn ci_gate_is_set_and_not_false_or_zero() {
    for (v, want) in [
        (None, false),
        (Some(""), false),
        (Some("false"), false),
        (Some("FALSE"), false),
        (Some("0"), false),
        (Some("true"), true),
        (Some("1"), true),
        (Some("yes"), true),
    ] {
        assert_eq!(ci_value(v), want, "CI={v:?}");
    }
}
