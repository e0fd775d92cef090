//! `junit.xml` through quick-junit (it escapes control characters and `]]>` safely, which
//! real bwrap and Codex output needs): one testsuite per environment, one testcase per cell,
//! the cell's axes as properties, failure = signature + message, stderr tail as system-err.

use std::time::Duration;

use quick_junit::{
    FlakyOrRerun, NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestRerun, TestSuite,
};

use super::model::{CellResult, RunResults, Status};

pub fn render(run: &RunResults) -> String {
    let mut report = Report::new(format!("nsmatrix {}", run.run_name));
    report.set_time(Duration::from_millis(run.duration_ms));
    // Suites in first-seen order of environments.
    let mut order: Vec<&str> = Vec::new();
    for c in &run.cells {
        if !order.contains(&c.environment.as_str()) {
            order.push(&c.environment);
        }
    }
    // Coverage first: an empty suite whose properties say what did not run and why, and
    // whether that broke the run's requirement (CI dashboards show suite properties).
    let groups = super::coverage::skips_by_reason(run);
    if !groups.is_empty() || !run.require.is_empty() {
        let mut suite = TestSuite::new("nsmatrix.coverage");
        let skipped: usize = groups.iter().map(|g| g.cells).sum();
        suite.add_property(Property::new("coverage.skipped", skipped.to_string()));
        suite.add_property(Property::new("coverage.required", run.require.join(",")));
        let lost = super::coverage::lost_line(run);
        if !lost.is_empty() {
            suite.add_property(Property::new("coverage.lost", lost));
        }
        for (i, g) in groups.iter().enumerate() {
            suite.add_property(Property::new(
                format!("coverage.skip.{}", i + 1),
                format!(
                    "{} {} cells{}: {}",
                    g.cells,
                    g.backend,
                    if g.required { " (required)" } else { "" },
                    g.reason
                ),
            ));
        }
        report.add_test_suite(suite);
    }
    for env in order {
        let mut suite = TestSuite::new(env);
        let mut total = Duration::ZERO;
        for c in run.cells.iter().filter(|c| c.environment == env) {
            let tc = testcase(c);
            total += Duration::from_millis(c.duration_ms);
            suite.add_test_case(tc);
        }
        suite.set_time(total);
        if let Some(b) = run.batches.iter().find(|b| b.environment == env) {
            for (k, v) in &b.facts {
                suite.add_property(Property::new(format!("env.{k}"), v.as_str()));
            }
        }
        report.add_test_suite(suite);
    }
    report.to_string().expect("junit serialises")
}

fn testcase(c: &CellResult) -> TestCase {
    let name =
        c.id.strip_prefix(&format!("{}/", c.environment))
            .unwrap_or(&c.id)
            .to_string();
    let status = match c.status {
        Status::Pass | Status::Xfail => TestCaseStatus::success(),
        Status::Fail | Status::Xpass => {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
            let sig = c.signature.as_deref().unwrap_or("unexpected-pass");
            s.set_message(format!("{sig}: {}", c.message));
            s.set_type(sig);
            s.set_description(failure_text(c));
            s
        }
        Status::Error => {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
            s.set_message(c.message.clone());
            s.set_type("harness-error");
            s.set_description(failure_text(c));
            s
        }
        Status::Skip => {
            let mut s = TestCaseStatus::skipped();
            s.set_message(c.message.clone());
            s
        }
    };
    let mut status = status;
    add_repeats(c, &mut status);
    let mut tc = TestCase::new(name, status);
    tc.set_classname(c.environment.clone());
    tc.set_time(Duration::from_millis(c.duration_ms));
    tc.add_property(Property::new("status", c.status.as_str()));
    tc.add_property(Property::new("observed", c.observed.as_str()));
    if !c.repeats.is_empty() {
        tc.add_property(Property::new(
            "flaky",
            if c.flaky { "true" } else { "false" },
        ));
        let reps: Vec<&str> = c.repeats.iter().map(|r| r.status.as_str()).collect();
        tc.add_property(Property::new("repeats", reps.join(",")));
    }
    for (k, v) in &c.axes {
        tc.add_property(Property::new(format!("axis.{k}"), v.as_str()));
    }
    for (k, v) in &c.details {
        tc.add_property(Property::new(format!("detail.{k}"), v.as_str()));
    }
    // The guest kernel's lines about the cell's sandbox (AppArmor's audit lines...) follow
    // its stdout: the evidence where CI shows a test's output.
    let mut out = c.stdout_tail.clone();
    if let Some(k) = c.details.get("kernel.log") {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("kernel log:\n");
        out.push_str(k);
    }
    if !out.is_empty() {
        tc.set_system_out(out);
    }
    if !c.stderr_tail.is_empty() {
        tc.set_system_err(c.stderr_tail.clone());
    }
    tc
}

/// `--repeat N`: a flaky cell that counts as failed (its worst repeat) carries one
/// `<flakyFailure>`/`<flakyError>` per failed repeat; a cell that failed every repeat carries
/// one `<rerunFailure>`/`<rerunError>` per repeat after the first. Passing cells carry none.
fn add_repeats(c: &CellResult, status: &mut TestCaseStatus) {
    if c.repeats.len() < 2 || !matches!(status, TestCaseStatus::NonSuccess { .. }) {
        return;
    }
    let kind_of = |s: Status| match s {
        Status::Error => Some(NonSuccessKind::Error),
        Status::Fail | Status::Xpass => Some(NonSuccessKind::Failure),
        _ => None,
    };
    let n = c.repeats.len();
    let runs: Vec<TestRerun> = c
        .repeats
        .iter()
        .filter(|r| c.flaky || r.repeat != c.repeat)
        .filter_map(|r| {
            let kind = kind_of(r.status)?;
            let mut t = TestRerun::new(kind);
            t.set_message(format!(
                "repeat {} of {n}: {} {}: {}",
                r.repeat,
                r.status.as_str(),
                r.signature.as_deref().unwrap_or(&r.observed),
                r.message
            ));
            t.set_time(Duration::from_millis(r.duration_ms));
            Some(t)
        })
        .collect();
    status.set_rerun_kind(if c.flaky {
        FlakyOrRerun::Flaky
    } else {
        FlakyOrRerun::Rerun
    });
    status.add_reruns(runs);
    if c.flaky
        && let TestCaseStatus::NonSuccess { message, .. } = status
    {
        let reps: Vec<&str> = c.repeats.iter().map(|r| r.status.as_str()).collect();
        let m = format!(
            "flaky ({}): {}",
            reps.join(", "),
            message.as_ref().map(|m| m.as_str()).unwrap_or("")
        );
        status.set_message(m);
    }
}

fn failure_text(c: &CellResult) -> String {
    let mut s = String::new();
    if let Some(r) = &c.remedy {
        s.push_str(&format!("remedy: {r}\n"));
    }
    if !c.stderr_tail.is_empty() {
        s.push_str("stderr (tail):\n");
        s.push_str(&c.stderr_tail);
    }
    if let Some(k) = c.details.get("kernel.log") {
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str("kernel log:\n");
        s.push_str(k);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::model::{RunResults, fold_repeats, sample_cell};

    fn run_of(cells: Vec<CellResult>) -> RunResults {
        RunResults {
            repeat: 3,
            ..crate::report::model::sample_run(cells)
        }
    }

    #[test]
    fn flaky_and_rerun_elements() {
        let rep = |id: &str, k: u32, st: Status, obs: &str| {
            let mut c = sample_cell(id, st, obs);
            c.repeat = k;
            c
        };
        let cells = fold_repeats(vec![
            rep("e/s/core/flaky", 1, Status::Pass, "pass"),
            rep("e/s/core/flaky", 2, Status::Fail, "userns-denied"),
            rep("e/s/core/flaky", 3, Status::Pass, "pass"),
            rep("e/s/core/broken", 1, Status::Fail, "capset-denied"),
            rep("e/s/core/broken", 2, Status::Fail, "capset-denied"),
            rep("e/s/core/broken", 3, Status::Fail, "capset-denied"),
            rep("e/s/core/fine", 1, Status::Pass, "pass"),
            rep("e/s/core/fine", 2, Status::Pass, "pass"),
            rep("e/s/core/fine", 3, Status::Pass, "pass"),
        ]);
        let xml = render(&run_of(cells));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let case = |name: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name("testcase") && n.attribute("name") == Some(name))
                .unwrap()
        };
        let kids = |name: &str, tag: &str| {
            case(name)
                .children()
                .filter(|n| n.has_tag_name(tag))
                .count()
        };
        assert_eq!(kids("s/core/flaky", "failure"), 1);
        assert_eq!(kids("s/core/flaky", "flakyFailure"), 1);
        let msg = case("s/core/flaky")
            .children()
            .find(|n| n.has_tag_name("failure"))
            .unwrap()
            .attribute("message")
            .unwrap()
            .to_string();
        assert!(msg.starts_with("flaky (PASS, FAIL, PASS)"), "{msg}");
        assert_eq!(kids("s/core/broken", "failure"), 1);
        assert_eq!(kids("s/core/broken", "rerunFailure"), 2);
        assert_eq!(kids("s/core/fine", "failure"), 0);
        assert_eq!(kids("s/core/fine", "flakyFailure"), 0);
    }
}
