//! The results schema (versioned): one [`CellResult`] per cell, judged against its
//! expectation, and the [`RunResults`] that every renderer reads.
//!
//! `results.jsonl` holds one `CellResult` per line as cells finish; `results.json` holds the
//! whole `RunResults`. Bump [`SCHEMA_VERSION`] on any incompatible change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::matrix::model::{Cell, Expectation};
use crate::protocol::{CellRecord, Outcome};

pub const SCHEMA_VERSION: u32 = 2;
/// The oldest schema `load` still reads: version 2 only added fields with defaults
/// (`require`, `evidence`), so version 1 files load with them empty.
pub const OLDEST_READABLE_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Fail,
    Xfail,
    Xpass,
    Error,
    Skip,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Pass,
        Status::Fail,
        Status::Xfail,
        Status::Xpass,
        Status::Error,
        Status::Skip,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Xfail => "XFAIL",
            Status::Xpass => "XPASS",
            Status::Error => "ERROR",
            Status::Skip => "SKIP",
        }
    }

    /// The mark used in report grids.
    pub fn mark(self) -> &'static str {
        match self {
            Status::Pass => "✅",
            Status::Xfail => "✅ˣ",
            Status::Fail => "❌",
            Status::Xpass => "❌⁺",
            Status::Error => "⚠",
            Status::Skip => "⏭",
        }
    }

    /// Met its expectation (or did not run for a stated reason). A SKIP is not a failure of
    /// the product, but it is lost coverage: see `report::coverage` and the run's `require`.
    pub fn is_ok(self) -> bool {
        matches!(self, Status::Pass | Status::Xfail | Status::Skip)
    }
}

/// One cell, judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CellResult {
    pub id: String,
    /// The environment's id = the batch this cell ran in.
    pub environment: String,
    pub backend: String,
    pub subject: String,
    pub scenario_set: String,
    pub scenario: String,
    pub axes: BTreeMap<String, String>,
    pub status: Status,
    pub expected: Expectation,
    /// What was seen: `pass`, or a failure signature, `error`, `skip`.
    pub observed: String,
    pub signature: Option<String>,
    pub message: String,
    pub remedy: Option<String>,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub details: BTreeMap<String, String>,
    /// 1 for the first try; more when an ERROR was retried.
    pub attempts: u32,
    /// Position of the cell in the expanded matrix: reports, shards and merges sort by it, so
    /// their order never depends on which batch finished first. 0 in files written before it.
    #[serde(default)]
    pub ordinal: usize,
    /// With `run --repeat N`: which repeat this record is (1-based); the folded cell in
    /// `results.json` carries its worst repeat here and every repeat in `repeats`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub repeat: u32,
    /// With `run --repeat N` (N > 1): every repeat of the cell, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repeats: Vec<RepeatRecord>,
    /// The status differed across repeats. Such a cell keeps its worst status, so it is never
    /// hidden by a lucky repeat.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flaky: bool,
    /// What the agent observed that the verdict rests on (every PASS has [`EVIDENCE_KEYS`]):
    /// `tree`, `output`, `setuid`, `sandbox`, `exit-code`, `confinement`. Empty in files
    /// written before schema 2.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evidence: BTreeMap<String, String>,
}

/// The evidence every PASS must carry; a pass without it is an ERROR of the harness.
pub const EVIDENCE_KEYS: [&str; 4] = ["tree", "output", "setuid", "sandbox"];

/// Split the agent's `evidence.*` details off into the evidence map.
fn split_evidence(
    details: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut evidence = BTreeMap::new();
    let mut rest = BTreeMap::new();
    for (k, v) in details {
        match k.strip_prefix("evidence.") {
            Some(e) => {
                evidence.insert(e.to_string(), v.clone());
            }
            None => {
                rest.insert(k.clone(), v.clone());
            }
        }
    }
    (evidence, rest)
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// One repeat of a cell (`run --repeat N`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RepeatRecord {
    pub repeat: u32,
    pub status: Status,
    pub observed: String,
    pub signature: Option<String>,
    pub message: String,
    pub duration_ms: u64,
}

impl Status {
    /// How bad a status is, for picking the representative of repeats: unexpected results
    /// first, then harness errors, then the rest.
    pub fn severity(self) -> u8 {
        match self {
            Status::Fail | Status::Xpass => 3,
            Status::Error => 2,
            Status::Xfail | Status::Pass => 1,
            Status::Skip => 0,
        }
    }
}

/// Fold the records of `--repeat N` into one cell per id (in first-seen order): the worst
/// repeat represents the cell, every repeat is kept, and a cell whose status differed across
/// repeats is marked flaky.
pub fn fold_repeats(records: Vec<CellResult>) -> Vec<CellResult> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: BTreeMap<String, Vec<CellResult>> = BTreeMap::new();
    for r in records {
        if !by_id.contains_key(&r.id) {
            order.push(r.id.clone());
        }
        by_id.entry(r.id.clone()).or_default().push(r);
    }
    let mut out = Vec::with_capacity(order.len());
    for id in order {
        let mut reps = by_id.remove(&id).unwrap_or_default();
        if reps.len() == 1 && reps[0].repeat == 1 {
            out.extend(reps);
            continue;
        }
        reps.sort_by_key(|r| r.repeat);
        let records: Vec<RepeatRecord> = reps
            .iter()
            .map(|r| RepeatRecord {
                repeat: r.repeat,
                status: r.status,
                observed: r.observed.clone(),
                signature: r.signature.clone(),
                message: r.message.clone(),
                duration_ms: r.duration_ms,
            })
            .collect();
        let flaky = records.iter().any(|r| r.status != records[0].status);
        // The worst repeat; among equals, the first.
        let worst = reps
            .iter()
            .enumerate()
            .max_by_key(|(i, r)| (r.status.severity(), std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let mut cell = reps.swap_remove(worst);
        cell.repeats = records;
        cell.flaky = flaky;
        out.push(cell);
    }
    out
}

/// Judge an agent's record of a cell against the cell's expectation.
pub fn judge(cell: &Cell, rec: &CellRecord, attempts: u32) -> CellResult {
    let (evidence, mut details) = split_evidence(&rec.details);
    // The errno beside the signature: the same line with another errno is another problem.
    if let Outcome::Failed { message, .. } = &rec.outcome
        && let Some(e) = crate::sandbox::signature::errno_of(message)
    {
        details.insert("errno".into(), e.into());
    }
    let missing: Vec<&str> = EVIDENCE_KEYS
        .iter()
        .copied()
        .filter(|k| !evidence.contains_key(*k))
        .collect();
    let unproven;
    let outcome = if matches!(rec.outcome, Outcome::Passed) && !missing.is_empty() {
        // A pass must rest on what was observed; without it there is no answer.
        unproven = Outcome::Error {
            stage: "judge".into(),
            message: format!(
                "the agent reported a pass without evidence of: {}",
                missing.join(", ")
            ),
        };
        &unproven
    } else {
        &rec.outcome
    };
    let (status, observed, signature, message) = match outcome {
        Outcome::Passed => match &cell.expect {
            Expectation::Pass => (Status::Pass, "pass".to_string(), None, String::new()),
            Expectation::Fail { signature, .. } => (
                Status::Xpass,
                "pass".into(),
                None,
                format!("expected to fail with {signature}, but passed"),
            ),
        },
        Outcome::Failed { signature, message } => {
            let status = match &cell.expect {
                Expectation::Fail {
                    signature: want, ..
                    // A family (`userns-denied`) is met by any of its members.
                } if crate::sandbox::signature::satisfies(want, signature) => Status::Xfail,
                _ => Status::Fail,
            };
            let msg = match (&cell.expect, status) {
                (
                    Expectation::Fail {
                        signature: want, ..
                    },
                    Status::Fail,
                ) => {
                    format!("expected {want}, got {signature}: {message}")
                }
                _ => message.clone(),
            };
            (status, signature.clone(), Some(signature.clone()), msg)
        }
        Outcome::Error { stage, message } => (
            Status::Error,
            "error".into(),
            None,
            format!("{stage}: {message}"),
        ),
        Outcome::Skipped { reason } => (Status::Skip, "skip".into(), None, reason.clone()),
    };
    let remedy = signature
        .as_deref()
        .map(crate::sandbox::signature::remedy)
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    CellResult {
        id: cell.id.clone(),
        environment: cell.env.id.clone(),
        backend: cell.env.backend().as_str().to_string(),
        subject: cell.subject.id.clone(),
        scenario_set: cell.scenario.set.clone(),
        scenario: cell.scenario.name.clone(),
        axes: cell.axes.clone(),
        status,
        expected: cell.expect.clone(),
        observed,
        signature,
        message,
        remedy,
        exit_code: rec.exit_code,
        duration_ms: rec.duration_ms,
        stdout_tail: rec.stdout_tail.clone(),
        stderr_tail: rec.stderr_tail.clone(),
        details,
        attempts,
        ordinal: 0,
        repeat: 1,
        repeats: Vec::new(),
        flaky: false,
        evidence,
    }
}

/// A cell that did not run: its record says why.
pub fn not_run(cell: &Cell, outcome: Outcome, attempts: u32) -> CellResult {
    let rec = CellRecord::outcome_only(&cell.id, outcome);
    judge(cell, &rec, attempts)
}

/// Facts about one batch (environment): what the agent reported, how long the stages took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BatchInfo {
    pub environment: String,
    pub backend: String,
    pub facts: BTreeMap<String, String>,
    pub stage_ms: BTreeMap<String, u64>,
    pub error: Option<String>,
}

/// The whole run, as written to `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunResults {
    pub schema_version: u32,
    pub run_name: String,
    pub matrix: String,
    pub started: String,
    pub duration_ms: u64,
    /// Set when the run was stopped early (Ctrl-C, fail-fast, deadline).
    pub interrupted: Option<String>,
    pub host: BTreeMap<String, String>,
    pub batches: Vec<BatchInfo>,
    pub cells: Vec<CellResult>,
    /// `run --shard K/N`: which part of the matrix this run holds (`merge` checks them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
    /// `run --repeat N`: how often every cell ran (1 when absent).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub repeat: u32,
    /// Backends whose cells must run (`[settings] require`, `run --require`): a SKIP of one
    /// of their cells is lost coverage and fails the run (exit 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<String>,
    /// When each batch ran on which job slot, stage by stage (`timeline.svg`); absent in
    /// merged shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<super::timeline::Timeline>,
}

/// Which shard of how many a run was, and which environments (batches) it held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ShardInfo {
    pub index: u32,
    pub count: u32,
    /// Cells of the whole (filtered) matrix, across all shards: merge checks it got them all.
    pub total_cells: usize,
}

impl RunResults {
    pub fn counts(&self) -> BTreeMap<Status, usize> {
        let mut c: BTreeMap<Status, usize> = Status::ALL.iter().map(|s| (*s, 0)).collect();
        for cell in &self.cells {
            *c.entry(cell.status).or_default() += 1;
        }
        c
    }
}

/// A run of these cells for unit tests of pure functions (repeat 1, nothing required).
#[cfg(test)]
pub(crate) fn sample_run(cells: Vec<CellResult>) -> RunResults {
    RunResults {
        schema_version: SCHEMA_VERSION,
        run_name: "t".into(),
        matrix: "m".into(),
        started: "s".into(),
        duration_ms: 1,
        interrupted: None,
        host: Default::default(),
        batches: vec![],
        cells,
        shard: None,
        repeat: 1,
        require: Vec::new(),
        timeline: None,
    }
}

/// A cell result for unit tests of pure functions.
#[cfg(test)]
pub(crate) fn sample_cell(id: &str, status: Status, observed: &str) -> CellResult {
    let (env, rest) = id.split_once('/').unwrap_or((id, "s"));
    let subject = rest.split('/').next().unwrap_or("s");
    CellResult {
        id: id.into(),
        environment: env.into(),
        backend: "host".into(),
        subject: subject.into(),
        scenario_set: "core".into(),
        scenario: id.rsplit('/').next().unwrap_or("a").into(),
        axes: BTreeMap::new(),
        status,
        expected: Expectation::Pass,
        observed: observed.into(),
        signature: (observed != "pass" && observed != "error").then(|| observed.to_string()),
        message: String::new(),
        remedy: None,
        exit_code: None,
        duration_ms: 10,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        details: BTreeMap::new(),
        attempts: 1,
        ordinal: 0,
        repeat: 1,
        repeats: Vec::new(),
        flaky: false,
        evidence: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    #[test]
    fn fold_keeps_every_repeat_and_the_worst_status() {
        let rep = |k: u32, st: Status, obs: &str| {
            let mut c = sample_cell("e/s/core/a", st, obs);
            c.repeat = k;
            c
        };
        let steady = |k: u32| {
            let mut c = sample_cell("e/s/core/b", Status::Pass, "pass");
            c.repeat = k;
            c
        };
        let folded = fold_repeats(vec![
            rep(1, Status::Pass, "pass"),
            steady(1),
            rep(2, Status::Fail, "userns-denied"),
            steady(2),
            rep(3, Status::Pass, "pass"),
        ]);
        assert_eq!(folded.len(), 2);
        let a = &folded[0];
        assert_eq!(a.id, "e/s/core/a");
        assert!(a.flaky);
        assert_eq!((a.status, a.repeat), (Status::Fail, 2));
        assert_eq!(
            a.repeats.iter().map(|r| r.status).collect::<Vec<_>>(),
            vec![Status::Pass, Status::Fail, Status::Pass]
        );
        let b = &folded[1];
        assert!(!b.flaky);
        assert_eq!((b.status, b.repeats.len()), (Status::Pass, 2));
        // A single run is left as it is.
        let one = fold_repeats(vec![sample_cell("x/y/core/z", Status::Pass, "pass")]);
        assert!(one[0].repeats.is_empty());
    }

    #[test]
    fn exit_code_table() {
        use Status::*;
        let cases: &[(&[Status], u8)] = &[
            (&[], exit::OK),
            (&[Pass, Xfail, Skip], exit::OK),
            (&[Pass, Error], exit::ERRORS),
            (&[Error, Fail], exit::FAILURES),
            (&[Xpass, Error], exit::FAILURES),
        ];
        for (st, want) in cases {
            assert_eq!(super::super::for_statuses(st.iter()), *want, "{st:?}");
        }
    }
}

/// The core rule, table-driven: every expectation × every outcome, including a wrong
/// signature (FAIL, never XFAIL) and cells that were lost (never reported: ERROR, never PASS).
#[cfg(test)]
mod judge_tests {
    use super::*;
    use crate::protocol::{CellRecord, Outcome};

    /// A real cell of the default matrix, with the expectation under test.
    fn cell(expect: Expectation) -> Cell {
        static FIRST: std::sync::OnceLock<Cell> = std::sync::OnceLock::new();
        let mut c = FIRST
            .get_or_init(|| {
                crate::matrix::load(std::path::Path::new("matrix.toml"))
                    .expect("default matrix")
                    .cells[0]
                    .clone()
            })
            .clone();
        c.expect = expect;
        c
    }

    fn fail_expect(sig: &str) -> Expectation {
        Expectation::Fail {
            signature: sig.into(),
            reason: None,
        }
    }

    fn failed(sig: &str) -> Outcome {
        Outcome::Failed {
            signature: sig.into(),
            message: format!("bwrap: {sig} happened"),
        }
    }

    #[test]
    fn expectation_times_outcome() {
        let passed = Outcome::Passed;
        let error = Outcome::Error {
            stage: "run".into(),
            message: "guest hung".into(),
        };
        let skipped = Outcome::Skipped {
            reason: "no Docker engine".into(),
        };
        // (expectation, outcome, status, observed, signature, message contains)
        type Case = (
            Expectation,
            Outcome,
            Status,
            &'static str,
            Option<&'static str>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                Expectation::Pass,
                passed.clone(),
                Status::Pass,
                "pass",
                None,
                "",
            ),
            (
                Expectation::Pass,
                failed("userns-denied"),
                Status::Fail,
                "userns-denied",
                Some("userns-denied"),
                "userns-denied happened",
            ),
            (
                fail_expect("userns-denied"),
                failed("userns-denied"),
                Status::Xfail,
                "userns-denied",
                Some("userns-denied"),
                "userns-denied happened",
            ),
            // The wrong failure is a FAIL, never an XFAIL, and says what was expected.
            (
                fail_expect("userns-denied"),
                failed("capset-denied"),
                Status::Fail,
                "capset-denied",
                Some("capset-denied"),
                "expected userns-denied, got capset-denied",
            ),
            (
                fail_expect("userns-denied"),
                passed.clone(),
                Status::Xpass,
                "pass",
                None,
                "expected to fail with userns-denied, but passed",
            ),
            (
                Expectation::Pass,
                error.clone(),
                Status::Error,
                "error",
                None,
                "run: guest hung",
            ),
            (
                fail_expect("userns-denied"),
                error,
                Status::Error,
                "error",
                None,
                "guest hung",
            ),
            (
                Expectation::Pass,
                skipped.clone(),
                Status::Skip,
                "skip",
                None,
                "no Docker engine",
            ),
            (
                fail_expect("userns-denied"),
                skipped,
                Status::Skip,
                "skip",
                None,
                "no Docker engine",
            ),
        ];
        for (i, (expect, outcome, status, observed, sig, msg)) in cases.into_iter().enumerate() {
            let c = cell(expect.clone());
            let mut rec = CellRecord::outcome_only(&c.id, outcome.clone());
            if outcome == Outcome::Passed {
                for k in EVIDENCE_KEYS {
                    rec.details
                        .insert(format!("evidence.{k}"), format!("{k} seen"));
                }
            }
            let r = judge(&c, &rec, 1);
            let what = format!("case {i}: {expect:?} × {outcome:?}");
            assert_eq!(r.status, status, "{what}");
            assert_eq!(r.observed, observed, "{what}");
            assert_eq!(r.signature.as_deref(), sig, "{what}");
            assert!(r.message.contains(msg), "{what}: {}", r.message);
            assert_eq!(r.expected, expect, "{what}");
            // Only an unexpected result fails the run; an ERROR gives 3; PASS/XFAIL/SKIP 0.
            let want_exit = match status {
                Status::Fail | Status::Xpass => crate::exit::FAILURES,
                Status::Error => crate::exit::ERRORS,
                _ => crate::exit::OK,
            };
            assert_eq!(super::super::for_statuses([&r.status]), want_exit, "{what}");
        }
    }

    /// A pass without its evidence is no answer (ERROR naming what is missing); with it, the
    /// evidence moves out of the details into the result.
    #[test]
    fn a_pass_needs_its_evidence() {
        let c = cell(Expectation::Pass);
        let mut rec = CellRecord::outcome_only(&c.id, Outcome::Passed);
        rec.details
            .insert("evidence.tree".into(), "compared with expected/".into());
        rec.details
            .insert("bwrap.version".into(), "bubblewrap 0.8.0".into());
        let r = judge(&c, &rec, 1);
        assert_eq!(r.status, Status::Error);
        assert!(
            r.message
                .contains("without evidence of: output, setuid, sandbox"),
            "{}",
            r.message
        );
        for k in ["output", "setuid", "sandbox"] {
            rec.details.insert(format!("evidence.{k}"), "seen".into());
        }
        let r = judge(&c, &rec, 1);
        assert_eq!(r.status, Status::Pass);
        assert_eq!(r.evidence["tree"], "compared with expected/");
        assert_eq!(r.evidence.len(), 4);
        assert!(r.details.keys().all(|k| !k.starts_with("evidence.")));
        assert_eq!(r.details["bwrap.version"], "bubblewrap 0.8.0");
    }

    /// A cell that was never reported (its batch died) is judged as an ERROR naming the
    /// stage, never a PASS, whatever it expected.
    #[test]
    fn lost_cells_are_errors_never_passes() {
        for expect in [Expectation::Pass, fail_expect("userns-denied")] {
            let c = cell(expect);
            let r = not_run(
                &c,
                Outcome::Error {
                    stage: "agent".into(),
                    message: "the agent did not report this cell".into(),
                },
                2,
            );
            assert_eq!(r.status, Status::Error);
            assert_eq!(r.attempts, 2);
            assert!(r.message.starts_with("agent: "), "{}", r.message);
            assert!(!r.status.is_ok());
        }
    }
}
