//! Snapshot tests (insta) of what people read: the bwrap argv each profile renders, the
//! matrix diagnostics, and report.md. Times, paths and run ids go through a redactor, so a
//! snapshot changes only when the output's shape does. Review changes with `cargo insta
//! review` (or accept with `INSTA_UPDATE=always`), never by editing the `.snap` files.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use crate::protocol::ArgvProfile;
use crate::report::Status;
use crate::report::model::{BatchInfo, RunResults, SCHEMA_VERSION, sample_cell};
use crate::sandbox::argv::{BwrapFeatures, build};

/// Times, durations, temporary paths and run ids, replaced by placeholders.
fn redactions() -> Vec<(&'static str, &'static str)> {
    vec![
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "[time]"),
        (r"\b\d+(\.\d+)? ?(ms|s)\b", "[duration]"),
        (r"/(tmp|var/tmp)/[^\s)`|]+", "[path]"),
        (r"\b\d{8}-\d{6}(-\d+)?\b", "[run-id]"),
    ]
}

#[test]
fn bwrap_argv_per_profile() {
    let cmd = [OsString::from("/x/apply_patch"), OsString::from("PATCH")];
    let ws = Path::new("/nonexistent-ws");
    let mut out = String::new();
    for profile in [ArgvProfile::Codex, ArgvProfile::CodexLegacy] {
        for argv0 in [true, false] {
            let argv = build(profile, BwrapFeatures { argv0 }, ws, &cmd);
            out.push_str(&format!("{} argv0={argv0}:\n", profile.as_str()));
            for a in argv {
                out.push_str(&format!("  {}\n", a.to_string_lossy()));
            }
        }
    }
    insta::assert_snapshot!(out);
}

#[test]
fn matrix_diagnostics() {
    let text = r#"[settings]
cell-timeout = "soon"

[profile.none]
description = "nothing"

[[environment]]
name = "vm"
backend = "qemu"
kernel = "debian-6.1x"
image = "bookwrm"

[[environment]]
name = "host"
backend = "host"
profile = "nope"

[[subject]]
name = "bwrap"
kind = "bwrap"
argv = ["codex", "codex-legacy"]
setuid = "sometimes"

[[scenarios]]
name = "core"
dir = "scenarios"
"#;
    // Nothing here depends on time or place: no redactor.
    let err = crate::matrix::load_str(Path::new("m.toml"), text).expect_err("bad input");
    insta::assert_snapshot!(err.to_string());
}

#[test]
fn report_md() {
    let mut fail = sample_cell(
        "host-none/bwrap/core/add_file",
        Status::Fail,
        "userns-denied",
    );
    fail.message = "bwrap: No permissions to create new namespace".into();
    fail.stderr_tail = "bwrap: No permissions to create new namespace\n".into();
    let cells = vec![
        sample_cell("host-none/bwrap/core/update", Status::Pass, "pass"),
        fail,
        sample_cell(
            "host-seccomp/bwrap/core/add_file",
            Status::Xfail,
            "userns-denied",
        ),
        sample_cell("docker-x/bwrap/smoke/add_file", Status::Error, "error"),
        sample_cell("qemu-y/bwrap/smoke/add_file", Status::Skip, "skip"),
    ];
    let run = RunResults {
        schema_version: SCHEMA_VERSION,
        run_name: "20261130-101500".into(),
        matrix: "/tmp/some/matrix.toml".into(),
        started: "2026-11-30T10:15:00Z".into(),
        duration_ms: 1234,
        interrupted: None,
        host: BTreeMap::from([("kernel".to_string(), "6.1.0".to_string())]),
        batches: vec![BatchInfo {
            environment: "host-none".into(),
            backend: "host".into(),
            stage_ms: BTreeMap::from([("run".to_string(), 120)]),
            ..Default::default()
        }],
        cells,
        shard: None,
        repeat: 1,
        require: Vec::new(),
        timeline: None,
    };
    let md = crate::report::markdown::render_with(&run, &Default::default());
    insta::with_settings!({ filters => redactions() }, {
        insta::assert_snapshot!(md);
    });
}
