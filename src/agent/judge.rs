//! [`judge`]: what one sandboxed run means for its scenario, most severe first: a write
//! outside the workspace, the sandbox front end's own failure (by signature), a timeout, then
//! apply_patch's exit code, output and tree.

use std::fs;

use super::cell::{Layout, RunOutput, SENTINEL_TEXT, list_outside};
use crate::protocol::Outcome;
use crate::sandbox::signature;
use crate::scenario::{self, Scenario};
use crate::text::tail;

/// Decide what the run means for this scenario, most severe first.
pub(super) fn judge(
    sc: &Scenario,
    layout: &Layout,
    run: &RunOutput,
    norm: &dyn Fn(&str) -> String,
    setuid_ignored_by_nnp: bool,
    facts: &signature::Facts,
) -> Outcome {
    let fail = |sig: &str, message: String| Outcome::Failed {
        signature: sig.into(),
        message,
    };
    // 1. Confinement: the sentinel and everything outside the workspace must be as before.
    let sentinel_now = fs::read_to_string(&layout.sentinel).ok();
    if sentinel_now.as_deref() != Some(SENTINEL_TEXT) {
        return fail(
            "sandbox-escape",
            format!(
                "the sentinel {} was changed or removed",
                layout.sentinel.display()
            ),
        );
    }
    let after = list_outside(layout.outside_dir.parent().unwrap_or(&layout.outside_dir));
    let created: Vec<_> = after
        .difference(&layout.before_outside)
        .filter(|p| !matches!(p.as_str(), "stdout" | "stderr"))
        .collect();
    if !created.is_empty() {
        return fail(
            "sandbox-escape",
            format!("files appeared outside the workspace: {created:?}"),
        );
    }
    if let Some(p) = layout
        .absolute_targets
        .iter()
        .find(|p| fs::symlink_metadata(p).is_ok())
    {
        return fail(
            "sandbox-escape",
            format!("{} was written outside the workspace", p.display()),
        );
    }
    // 2. The sandbox front end itself failed (bwrap's messages).
    if let Some(sig) = signature::classify(&run.stderr) {
        let msg = first_line_matching(&run.stderr, "bwrap")
            .unwrap_or_else(|| run.stderr.trim().to_string());
        if setuid_ignored_by_nnp && sig.name.starts_with("userns-") {
            return fail(
                "setuid-ignored-nnp",
                format!("{msg} (setuid bit ignored under no-new-privileges)"),
            );
        }
        // A family row becomes its member when bwrap's line and the observed facts say which.
        let sig = signature::refine(sig, &msg, facts);
        return fail(sig.name, msg);
    }
    if let Some(line) = signature::front_end_line(&run.stderr) {
        return fail(
            "unknown",
            format!("the sandbox failed with a message no signature knows: {line}"),
        );
    }
    if run.timed_out {
        return fail("timeout", "killed after the cell's timeout".into());
    }
    if let Some(sig) = run.signal {
        return fail(
            "unknown",
            format!(
                "killed by signal {sig}; stderr: {}",
                tail(run.stderr.trim())
            ),
        );
    }
    // 3. apply_patch's exit code.
    let want = match &sc.meta.confinement {
        Some(c) => c.sandboxed_exit_code,
        None => sc.meta.exit_code,
    };
    if run.code != Some(want) {
        let sig = if run.code == Some(1) || run.code == Some(2) || run.code == Some(0) {
            "apply-patch-error"
        } else {
            "unknown"
        };
        return fail(
            sig,
            format!(
                "apply_patch exited {:?}, the scenario expects {want}; stderr: {}",
                run.code,
                tail(norm(run.stderr.trim()).as_str())
            ),
        );
    }
    // 4. Output: ordinary scenarios against scenario.toml's stdout/stderr; confined ones
    // against what Codex printed in its own sandbox (with the cell directory as <CELL>).
    if let Some(c) = &sc.meta.confinement {
        let cell_dir = layout.ws.parent().unwrap_or(&layout.ws).to_string_lossy();
        for (name, text, expect) in [
            ("stdout", &run.stdout, &c.sandboxed_stdout),
            ("stderr", &run.stderr, &c.sandboxed_stderr),
        ] {
            if let Some(e) = expect {
                let got = norm(text).replace(&*cell_dir, "<CELL>");
                if !e.matches(&got) {
                    return fail(
                        "output-mismatch",
                        format!("{name} is {got:?}, expected (sandboxed) {e:?}"),
                    );
                }
            }
        }
    } else {
        for (name, text, expect) in [
            ("stdout", &run.stdout, &sc.meta.stdout),
            ("stderr", &run.stderr, &sc.meta.stderr),
        ] {
            if let Some(e) = expect {
                let got = norm(text);
                if !e.matches(&got) {
                    return fail(
                        "output-mismatch",
                        format!("{name} is {got:?}, expected {e:?}"),
                    );
                }
            }
        }
    }
    // 5. The tree: expected/ (or input/ when nothing may change). A confined patch fails
    // part-way, so only `expected-sandboxed/`, where a scenario has one, says what stays.
    let checked = match &sc.meta.confinement {
        None => sc.check_tree(&layout.ws),
        Some(_) => {
            let exp = sc.dir.join("expected-sandboxed");
            if exp.is_dir() {
                scenario::compare_tree(&exp, &layout.ws)
            } else {
                Ok(())
            }
        }
    };
    if let Err(d) = checked {
        return fail("tree-mismatch", format!("{}: {}", d.path, d.summary));
    }
    Outcome::Passed
}

fn first_line_matching(text: &str, needle: &str) -> Option<String> {
    text.lines()
        .find(|l| l.contains(needle))
        .map(|l| l.trim().to_string())
}

/// What a PASS from [`judge`] rests on for this scenario, step by step as `judge` checked it
/// (it returns Passed only after every one of these): `evidence.confinement`, `.exit-code`,
/// `.output`, `.tree`. The caller adds `.sandbox` and `.setuid`, which it observed.
pub(super) fn passed_evidence(sc: &Scenario, ev: &mut super::observe::Evidence) {
    ev.set(
        "confinement",
        "sentinel unchanged, nothing created outside the workspace",
    );
    let code = match &sc.meta.confinement {
        Some(c) => c.sandboxed_exit_code,
        None => sc.meta.exit_code,
    };
    ev.set(
        "exit-code",
        format!("apply_patch exited {code} as expected"),
    );
    let output = match (&sc.meta.confinement, &sc.meta.stdout, &sc.meta.stderr) {
        (Some(c), _, _) => match (&c.sandboxed_stdout, &c.sandboxed_stderr) {
            (Some(_), Some(_)) => {
                "compared: stdout and stderr as Codex printed them in its sandbox".to_string()
            }
            (Some(_), None) => "compared: stdout as Codex printed it in its sandbox".to_string(),
            (None, Some(_)) => "compared: stderr as Codex printed it in its sandbox".to_string(),
            (None, None) => "not compared: no sandboxed output recorded".to_string(),
        },
        (None, None, None) => "not compared: the scenario states no output".to_string(),
        (None, o, e) => {
            let mut parts = Vec::new();
            if o.is_some() {
                parts.push("stdout");
            }
            if e.is_some() {
                parts.push("stderr");
            }
            format!("compared: {} as scenario.toml states", parts.join(" and "))
        }
    };
    ev.set("output", output);
    let tree = match &sc.meta.confinement {
        None => match sc.dir.join("expected").is_dir() {
            true => "compared with expected/".to_string(),
            false => "compared with input/ (nothing may change)".to_string(),
        },
        Some(_) if sc.dir.join("expected-sandboxed").is_dir() => {
            "compared with expected-sandboxed/".to_string()
        }
        Some(_) => "not compared: confinement scenario without expected-sandboxed/".to_string(),
    };
    ev.set("tree", tree);
}
