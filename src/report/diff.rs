//! What changed between two runs: [`diff`] pairs cells by id and returns a [`Diff`]
//! (regressions, fixes, signature changes, timing regressions against a stated noise band,
//! cells added and removed), rendered as Markdown or serialised as JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

use super::model::{CellResult, RunResults, Status};

/// Thresholds of the timing comparison.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiffOptions {
    /// A group's median time must grow by more than this fraction of the baseline median...
    pub time_threshold_pct: f64,
    /// ...and by more than this many milliseconds, to count as a timing regression.
    pub time_floor_ms: u64,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            time_threshold_pct: 50.0,
            time_floor_ms: 25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// Met its expectation before (PASS/XFAIL), now FAIL, XPASS or ERROR.
    Regression,
    /// FAIL, XPASS or ERROR before, now PASS or XFAIL.
    Fix,
    /// Failed before and now, with another signature.
    SignatureChange,
    /// Ran and met its expectation before (PASS/XFAIL), SKIPped now: lost coverage.
    LostCoverage,
    /// Any other change of status or observation (e.g. to or from SKIP).
    Other,
}

/// One side of a changed cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    pub status: Status,
    pub observed: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CellChange {
    pub kind: ChangeKind,
    pub id: String,
    pub environment: String,
    pub subject: String,
    pub scenario: String,
    pub base: Side,
    pub new: Side,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CellRef {
    pub id: String,
    pub environment: String,
    pub subject: String,
    pub status: Status,
}

/// A cell the baseline measured that the new run does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LostCell {
    pub id: String,
    pub environment: String,
    pub subject: String,
    pub base: Side,
    /// `None` when the cell is missing from the new run.
    pub new: Option<Side>,
    /// The SKIP's reason, or `missing from the new run`.
    pub reason: String,
}

/// One environment × subject whose median cell time grew beyond the noise band.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TimingChange {
    pub environment: String,
    pub subject: String,
    pub cells: usize,
    pub base_median_ms: f64,
    pub new_median_ms: f64,
    pub band_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timing {
    pub options: DiffOptions,
    /// How the comparison was made, in one sentence (shown in report.md).
    pub method: String,
    pub groups_compared: usize,
    pub regressions: Vec<TimingChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunRef {
    pub run_name: String,
    pub started: String,
    pub cells: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Diff {
    pub base: RunRef,
    pub new: RunRef,
    pub regressions: Vec<CellChange>,
    pub fixes: Vec<CellChange>,
    pub signature_changes: Vec<CellChange>,
    pub other_changes: Vec<CellChange>,
    /// Cells flaky in the new run that were not flaky (or not repeated) in the baseline.
    pub newly_flaky: Vec<String>,
    pub added: Vec<CellRef>,
    pub removed: Vec<CellRef>,
    /// Cells that ran and met their expectation in the baseline (PASS/XFAIL) and now are
    /// SKIPped or missing: what the new run no longer measures.
    pub lost_coverage: Vec<LostCell>,
    pub unchanged: usize,
    pub timing: Timing,
}

fn is_ok_ran(s: Status) -> bool {
    matches!(s, Status::Pass | Status::Xfail)
}

fn is_bad(s: Status) -> bool {
    matches!(s, Status::Fail | Status::Xpass | Status::Error)
}

fn failed_with(c: &CellResult) -> Option<&str> {
    c.signature.as_deref()
}

/// Classify one cell present in both runs; `None` when nothing changed.
pub fn classify(base: &CellResult, new: &CellResult) -> Option<ChangeKind> {
    if is_ok_ran(base.status) && is_bad(new.status) {
        return Some(ChangeKind::Regression);
    }
    if is_bad(base.status) && is_ok_ran(new.status) {
        return Some(ChangeKind::Fix);
    }
    if is_ok_ran(base.status) && new.status == Status::Skip {
        return Some(ChangeKind::LostCoverage);
    }
    if let (Some(a), Some(b)) = (failed_with(base), failed_with(new))
        && a != b
    {
        return Some(ChangeKind::SignatureChange);
    }
    if base.status != new.status || base.observed != new.observed {
        return Some(ChangeKind::Other);
    }
    None
}

fn cell_ref(c: &CellResult) -> CellRef {
    CellRef {
        id: c.id.clone(),
        environment: c.environment.clone(),
        subject: c.subject.clone(),
        status: c.status,
    }
}

/// A cell's time: the median of its repeats, or its one duration.
fn cell_ms(c: &CellResult) -> f64 {
    if c.repeats.is_empty() {
        c.duration_ms as f64
    } else {
        median(c.repeats.iter().map(|r| r.duration_ms as f64).collect()).unwrap_or(0.0)
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Times of one group's cells: (baseline, new).
type Paired = (Vec<f64>, Vec<f64>);

/// Compare `new` against `base`.
pub fn diff(base: &RunResults, new: &RunResults, opts: DiffOptions) -> Diff {
    let base_by: BTreeMap<&str, &CellResult> =
        base.cells.iter().map(|c| (c.id.as_str(), c)).collect();
    let new_ids: BTreeSet<&str> = new.cells.iter().map(|c| c.id.as_str()).collect();
    let mut d = Diff {
        base: RunRef {
            run_name: base.run_name.clone(),
            started: base.started.clone(),
            cells: base.cells.len(),
        },
        new: RunRef {
            run_name: new.run_name.clone(),
            started: new.started.clone(),
            cells: new.cells.len(),
        },
        regressions: Vec::new(),
        fixes: Vec::new(),
        signature_changes: Vec::new(),
        other_changes: Vec::new(),
        newly_flaky: Vec::new(),
        added: Vec::new(),
        removed: Vec::new(),
        lost_coverage: Vec::new(),
        unchanged: 0,
        timing: Timing {
            options: opts,
            method: String::new(),
            groups_compared: 0,
            regressions: Vec::new(),
        },
    };
    // Per environment × subject: (base times, new times) of cells that ran in both.
    let mut times: BTreeMap<(&str, &str), Paired> = BTreeMap::new();
    for n in &new.cells {
        let Some(b) = base_by.get(n.id.as_str()) else {
            d.added.push(cell_ref(n));
            continue;
        };
        if n.flaky && !b.flaky {
            d.newly_flaky.push(n.id.clone());
        }
        let ran = |c: &CellResult| !matches!(c.status, Status::Skip | Status::Error);
        if ran(b) && ran(n) {
            let e = times
                .entry((n.environment.as_str(), n.subject.as_str()))
                .or_default();
            e.0.push(cell_ms(b));
            e.1.push(cell_ms(n));
        }
        let Some(kind) = classify(b, n) else {
            d.unchanged += 1;
            continue;
        };
        let change = CellChange {
            kind,
            id: n.id.clone(),
            environment: n.environment.clone(),
            subject: n.subject.clone(),
            scenario: format!("{}/{}", n.scenario_set, n.scenario),
            base: Side {
                status: b.status,
                observed: b.observed.clone(),
            },
            new: Side {
                status: n.status,
                observed: n.observed.clone(),
            },
            message: n.message.clone(),
        };
        match kind {
            ChangeKind::LostCoverage => d.lost_coverage.push(LostCell {
                id: n.id.clone(),
                environment: n.environment.clone(),
                subject: n.subject.clone(),
                base: change.base,
                new: Some(change.new),
                reason: n.message.clone(),
            }),
            ChangeKind::Regression => d.regressions.push(change),
            ChangeKind::Fix => d.fixes.push(change),
            ChangeKind::SignatureChange => d.signature_changes.push(change),
            ChangeKind::Other => d.other_changes.push(change),
        }
    }
    for b in &base.cells {
        if !new_ids.contains(b.id.as_str()) {
            d.removed.push(cell_ref(b));
            if is_ok_ran(b.status) {
                d.lost_coverage.push(LostCell {
                    id: b.id.clone(),
                    environment: b.environment.clone(),
                    subject: b.subject.clone(),
                    base: Side {
                        status: b.status,
                        observed: b.observed.clone(),
                    },
                    new: None,
                    reason: "missing from the new run".into(),
                });
            }
        }
    }
    d.timing.groups_compared = times.len();
    for ((env, subject), (bt, nt)) in times {
        let cells = bt.len();
        let (Some(bm), Some(nm)) = (median(bt), median(nt)) else {
            continue;
        };
        let band = (bm * opts.time_threshold_pct / 100.0).max(opts.time_floor_ms as f64);
        if nm - bm > band {
            d.timing.regressions.push(TimingChange {
                environment: env.to_string(),
                subject: subject.to_string(),
                cells,
                base_median_ms: bm,
                new_median_ms: nm,
                band_ms: band,
            });
        }
    }
    d.timing.method = format!(
        "per environment × subject, the median of its cells' times (a repeated cell counts as \
         the median of its repeats) against the baseline's; noise band = max({}% of the \
         baseline median, {} ms); only cells that ran in both runs",
        opts.time_threshold_pct, opts.time_floor_ms
    );
    d
}

impl Diff {
    /// Any cell regressed (status), or any group got slower beyond the noise band when
    /// `timing` counts.
    pub fn has_regressions(&self, timing: bool) -> bool {
        !self.regressions.is_empty() || (timing && !self.timing.regressions.is_empty())
    }

    /// Cells measured in the baseline that the new run did not measure.
    pub fn has_lost_coverage(&self) -> bool {
        !self.lost_coverage.is_empty()
    }

    /// `diff`'s exit code: 1 for a regression, else 4 for lost coverage, else 0.
    pub fn exit_code(&self, timing: bool) -> u8 {
        if self.has_regressions(timing) {
            crate::exit::FAILURES
        } else if self.has_lost_coverage() {
            crate::exit::COVERAGE_LOST
        } else {
            crate::exit::OK
        }
    }

    /// Environment × subject pairs with any change of a cell (for the heat map's marks).
    pub fn changed_groups(&self) -> BTreeSet<(String, String)> {
        self.regressions
            .iter()
            .chain(&self.fixes)
            .chain(&self.signature_changes)
            .chain(&self.other_changes)
            .map(|c| (c.environment.clone(), c.subject.clone()))
            .chain(
                self.lost_coverage
                    .iter()
                    .map(|c| (c.environment.clone(), c.subject.clone())),
            )
            .chain(
                self.added
                    .iter()
                    .map(|c| (c.environment.clone(), c.subject.clone())),
            )
            .collect()
    }

    /// The Markdown section (`## Changes against baseline ...`).
    pub fn render_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Changes against baseline `{}`\n", self.base.run_name);
        let verdict = match (self.has_regressions(true), self.has_lost_coverage()) {
            (true, true) => "**Regressions found, and coverage was lost.**",
            (true, false) => "**Regressions found.**",
            (false, true) => "**Coverage lost** (no regression among the cells that ran).",
            (false, false) => "No regression.",
        };
        let _ = writeln!(
            md,
            "{verdict} Baseline `{}` ({} cells, started {}) → `{}` ({} cells): \
             **{} regressed**, **{} lost coverage**, {} fixed, {} changed signature, \
             {} other changes, {} timing regressions, {} newly flaky, {} added, {} removed, \
             {} unchanged.\n",
            self.base.run_name,
            self.base.cells,
            self.base.started,
            self.new.run_name,
            self.new.cells,
            self.regressions.len(),
            self.lost_coverage.len(),
            self.fixes.len(),
            self.signature_changes.len(),
            self.other_changes.len(),
            self.timing.regressions.len(),
            self.newly_flaky.len(),
            self.added.len(),
            self.removed.len(),
            self.unchanged
        );
        if !self.lost_coverage.is_empty() {
            let _ = writeln!(
                md,
                "### Lost coverage ({})\n\nMeasured in the baseline (PASS/XFAIL), not measured now.\n",
                self.lost_coverage.len()
            );
            let _ = writeln!(md, "| environment | subject | before | now | cells | why |");
            let _ = writeln!(md, "|---|---|---|---|---|---|");
            let mut groups: BTreeMap<(&str, &str, String, String, String), usize> = BTreeMap::new();
            for c in &self.lost_coverage {
                let now = c
                    .new
                    .as_ref()
                    .map(side_text)
                    .unwrap_or_else(|| "missing".into());
                let why = c.reason.lines().next().unwrap_or("").replace('|', "\\|");
                *groups
                    .entry((
                        c.environment.as_str(),
                        c.subject.as_str(),
                        side_text(&c.base),
                        now,
                        why,
                    ))
                    .or_default() += 1;
            }
            for ((env, subject, before, now, why), n) in groups {
                let _ = writeln!(
                    md,
                    "| `{env}` | `{subject}` | {before} | {now} | {n} | {why} |"
                );
            }
            md.push('\n');
        }
        for (title, list) in [
            ("Regressions", &self.regressions),
            ("Fixes", &self.fixes),
            ("Signature changes", &self.signature_changes),
            ("Other changes", &self.other_changes),
        ] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(md, "### {title} ({})\n", list.len());
            let _ = writeln!(
                md,
                "| environment | subject | before | now | cells | scenarios |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|");
            let mut groups: BTreeMap<(&str, &str, String, String), Vec<&str>> = BTreeMap::new();
            for c in list {
                groups
                    .entry((
                        c.environment.as_str(),
                        c.subject.as_str(),
                        side_text(&c.base),
                        side_text(&c.new),
                    ))
                    .or_default()
                    .push(c.scenario.as_str());
            }
            for ((env, subject, before, now), scenarios) in groups {
                let _ = writeln!(
                    md,
                    "| `{env}` | `{subject}` | {before} | {now} | {} | {} |",
                    scenarios.len(),
                    abbreviate(&scenarios, 6)
                );
            }
            md.push('\n');
        }
        if !self.newly_flaky.is_empty() {
            let _ = writeln!(md, "### Newly flaky ({})\n", self.newly_flaky.len());
            for id in &self.newly_flaky {
                let _ = writeln!(md, "- `{id}`");
            }
            md.push('\n');
        }
        let _ = writeln!(
            md,
            "### Timing ({} regressions in {} environment × subject groups)\n\n{}.\n",
            self.timing.regressions.len(),
            self.timing.groups_compared,
            capitalise(&self.timing.method)
        );
        if !self.timing.regressions.is_empty() {
            let _ = writeln!(
                md,
                "| environment | subject | cells | baseline median | now | noise band |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|");
            for t in &self.timing.regressions {
                let _ = writeln!(
                    md,
                    "| `{}` | `{}` | {} | {:.0} ms | {:.0} ms | ±{:.0} ms |",
                    t.environment, t.subject, t.cells, t.base_median_ms, t.new_median_ms, t.band_ms
                );
            }
            md.push('\n');
        }
        for (title, list) in [("Added", &self.added), ("Removed", &self.removed)] {
            if list.is_empty() {
                continue;
            }
            let mut groups: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            for c in list {
                *groups
                    .entry((c.environment.as_str(), c.subject.as_str()))
                    .or_default() += 1;
            }
            let _ = writeln!(md, "### {title} ({} cells)\n", list.len());
            for ((env, subject), n) in groups {
                let _ = writeln!(md, "- `{env}` × `{subject}`: {n}");
            }
            md.push('\n');
        }
        md
    }
}

fn side_text(s: &Side) -> String {
    if s.observed == "pass" || s.observed == s.status.as_str().to_lowercase() {
        s.status.as_str().to_string()
    } else {
        format!("{} `{}`", s.status.as_str(), s.observed)
    }
}

fn abbreviate(items: &[&str], n: usize) -> String {
    let shown: Vec<String> = items.iter().take(n).map(|s| format!("`{s}`")).collect();
    if items.len() > n {
        format!("{} … +{}", shown.join(", "), items.len() - n)
    } else {
        shown.join(", ")
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}

#[cfg(test)]
mod coverage_tests {
    use super::*;
    use crate::report::model::sample_cell;

    fn run_of(cells: Vec<CellResult>) -> RunResults {
        crate::report::model::sample_run(cells)
    }

    #[test]
    fn pass_or_xfail_to_skip_or_missing_is_lost_coverage_and_exits_4() {
        let base = run_of(vec![
            sample_cell("d/s/core/a", Status::Pass, "pass"),
            sample_cell("d/s/core/b", Status::Xfail, "userns-denied"),
            sample_cell("d/s/core/c", Status::Pass, "pass"),
            sample_cell("d/s/core/d", Status::Skip, "skip"),
        ]);
        let mut skipped = sample_cell("d/s/core/a", Status::Skip, "skip");
        skipped.message = "no Docker engine".into();
        let mut skipped_b = sample_cell("d/s/core/b", Status::Skip, "skip");
        skipped_b.message = "no Docker engine".into();
        let new = run_of(vec![
            skipped,
            skipped_b,
            sample_cell("d/s/core/d", Status::Skip, "skip"),
        ]);
        let d = diff(&base, &new, DiffOptions::default());
        let ids: Vec<&str> = d.lost_coverage.iter().map(|c| c.id.as_str()).collect();
        // c is missing; d was a SKIP before too (nothing lost).
        assert_eq!(ids, ["d/s/core/a", "d/s/core/b", "d/s/core/c"]);
        assert!(d.regressions.is_empty());
        assert_eq!(d.exit_code(true), crate::exit::COVERAGE_LOST);
        let md = d.render_markdown();
        assert!(md.contains("**Coverage lost**"), "{md}");
        assert!(md.contains("### Lost coverage (3)"), "{md}");
        assert!(md.contains("no Docker engine"), "{md}");
        assert!(
            md.contains("| PASS | missing | 1 | missing from the new run |"),
            "{md}"
        );
        // Unchanged runs lose nothing.
        let same = diff(&base, &base, DiffOptions::default());
        assert_eq!(same.exit_code(true), crate::exit::OK);
    }
}
