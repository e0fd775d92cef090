//! `junit.xml` through quick-junit (it escapes control characters and `]]>` safely, which
//! real bwrap and Codex output needs): one testsuite per environment, one testcase per cell,
//! the cell's axes as properties, failure = signature + message, stderr tail as system-err.

use std::time::Duration;

use quick_junit::{NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestSuite};

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
    let mut tc = TestCase::new(name, status);
    tc.set_classname(c.environment.clone());
    tc.set_time(Duration::from_millis(c.duration_ms));
    tc.add_property(Property::new("status", c.status.as_str()));
    tc.add_property(Property::new("observed", c.observed.as_str()));
    for (k, v) in &c.axes {
        tc.add_property(Property::new(format!("axis.{k}"), v.as_str()));
    }
    for (k, v) in &c.details {
        tc.add_property(Property::new(format!("detail.{k}"), v.as_str()));
    }
    if !c.stdout_tail.is_empty() {
        tc.set_system_out(c.stdout_tail.clone());
    }
    if !c.stderr_tail.is_empty() {
        tc.set_system_err(c.stderr_tail.clone());
    }
    tc
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
    s
}
