//! Release sign-off within one run: [`signoff`] pairs every cell whose `axis` is `from` with
//! the cell that differs from it in that axis alone (value `to`), sorts the pairs into fixed,
//! broken, unchanged-pass, unchanged-fail and inconclusive, and gives a [`Verdict`].
//!
//! It judges what was *observed* (did apply_patch work through the sandbox), not the matrix's
//! expectations: a release manager asks whether the new variant works, not whether someone
//! predicted it.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::model::{CellResult, RunResults, Status};

#[derive(Debug, thiserror::Error)]
pub enum SignoffError {
    #[error("no cell of run `{run}` has axis `{axis}`; its axes are: {known}")]
    UnknownAxis {
        run: String,
        axis: String,
        known: String,
    },
    #[error("no cell of run `{run}` has {axis}={value}; values of {axis} in this run: {known}")]
    UnknownValue {
        run: String,
        axis: String,
        value: String,
        known: String,
    },
    #[error(
        "no cell with {axis}={from} has a twin with {axis}={to} and every other axis equal: run both variants in the same run"
    )]
    NoPairs {
        axis: String,
        from: String,
        to: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairKind {
    /// Failed with `from`, passes with `to`.
    Fixed,
    /// Passed with `from`, fails with `to`.
    Broken,
    UnchangedPass,
    UnchangedFail,
    /// One side did not give an answer (ERROR or SKIP).
    Inconclusive,
}

impl PairKind {
    pub fn title(self) -> &'static str {
        match self {
            PairKind::Fixed => "fixed",
            PairKind::Broken => "broken",
            PairKind::UnchangedPass => "unchanged-pass",
            PairKind::UnchangedFail => "unchanged-fail",
            PairKind::Inconclusive => "inconclusive",
        }
    }
}

/// The pairs of one kind that share the `from` environment and subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PairGroup {
    pub kind: PairKind,
    pub from_environment: String,
    pub to_environment: String,
    pub from_subject: String,
    pub to_subject: String,
    /// What was observed on each side (`pass`, a signature, `error`, `skip`) with counts.
    pub from_observed: BTreeMap<String, usize>,
    pub to_observed: BTreeMap<String, usize>,
    pub scenarios: Vec<String>,
    /// A failure message of the `to` side (for unchanged-fail and broken).
    pub to_message: Option<String>,
}

// `no-verdict` is the serialised name reports and CI scripts read.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Ship,
    DoNotShip,
    NoVerdict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Signoff {
    pub run_name: String,
    pub axis: String,
    pub from: String,
    pub to: String,
    pub pairs: usize,
    pub counts: BTreeMap<PairKind, usize>,
    /// `to` cells still failing, by signature.
    pub remaining_failures: BTreeMap<String, usize>,
    pub groups: Vec<PairGroup>,
    /// Cells with `from` that have no twin with `to` (and the reverse).
    pub unpaired_from: usize,
    pub unpaired_to: usize,
    /// Why the two sides do not cover the same cells, one line per reason (pairs with a
    /// SKIPped side, by backend and reason; cells without a twin). Non-empty = no SHIP.
    pub lost_coverage: Vec<String>,
    pub verdict: Verdict,
    /// One line for a release checklist.
    pub verdict_line: String,
}

/// `--axis codex`: the Codex release, recorded in the cells as `version`.
const CODEX_AXIS: &str = "codex";

/// Axes that name a cell rather than describe it: they differ between twins for free.
const IGNORED: &[&str] = &["id"];

fn key_without(c: &CellResult, axis: &str) -> Vec<(String, String)> {
    c.axes
        .iter()
        .filter(|(k, _)| k.as_str() != axis && !IGNORED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn answered(c: &CellResult) -> bool {
    !matches!(c.status, Status::Error | Status::Skip)
}

fn passed(c: &CellResult) -> bool {
    c.observed == "pass"
}

/// Pair the cells of `run` that differ only in `axis` (`from` → `to`).
pub fn signoff(
    run: &RunResults,
    axis: &str,
    from: &str,
    to: &str,
) -> Result<Signoff, SignoffError> {
    // `codex` names the Codex subject's version axis (cells record it as `version`).
    let axis = if axis == CODEX_AXIS && !run.cells.iter().any(|c| c.axes.contains_key(axis)) {
        "version"
    } else {
        axis
    };
    if !run.cells.iter().any(|c| c.axes.contains_key(axis)) {
        let mut known: Vec<&str> = run
            .cells
            .iter()
            .flat_map(|c| c.axes.keys().map(String::as_str))
            .collect();
        known.sort();
        known.dedup();
        return Err(SignoffError::UnknownAxis {
            run: run.run_name.clone(),
            axis: axis.into(),
            known: known.join(", "),
        });
    }
    let values = || {
        let mut v: Vec<&str> = run
            .cells
            .iter()
            .filter_map(|c| c.axes.get(axis).map(String::as_str))
            .collect();
        v.sort();
        v.dedup();
        v.join(", ")
    };
    for value in [from, to] {
        if !run
            .cells
            .iter()
            .any(|c| c.axes.get(axis).is_some_and(|v| v == value))
        {
            return Err(SignoffError::UnknownValue {
                run: run.run_name.clone(),
                axis: axis.into(),
                value: value.into(),
                known: values(),
            });
        }
    }
    let side = |value: &str| -> BTreeMap<Vec<(String, String)>, &CellResult> {
        run.cells
            .iter()
            .filter(|c| c.axes.get(axis).is_some_and(|v| v == value))
            .map(|c| (key_without(c, axis), c))
            .collect()
    };
    let a = side(from);
    let b = side(to);
    let mut groups: BTreeMap<(PairKind, String, String, String, String), PairGroup> =
        BTreeMap::new();
    let mut counts: BTreeMap<PairKind, usize> = BTreeMap::new();
    let mut remaining: BTreeMap<String, usize> = BTreeMap::new();
    let mut pairs = 0;
    // Pairs with a SKIPped side, by backend and reason: lost coverage.
    let mut skipped: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (key, ca) in &a {
        let Some(cb) = b.get(key) else { continue };
        pairs += 1;
        if let Some(sk) = [ca, cb].into_iter().find(|c| c.status == Status::Skip) {
            let reason = sk.message.lines().next().unwrap_or("").to_string();
            *skipped.entry((sk.backend.clone(), reason)).or_default() += 1;
        }
        let kind = if !answered(ca) || !answered(cb) {
            PairKind::Inconclusive
        } else {
            match (passed(ca), passed(cb)) {
                (false, true) => PairKind::Fixed,
                (true, false) => PairKind::Broken,
                (true, true) => PairKind::UnchangedPass,
                (false, false) => PairKind::UnchangedFail,
            }
        };
        *counts.entry(kind).or_default() += 1;
        if answered(cb) && !passed(cb) {
            *remaining.entry(cb.observed.clone()).or_default() += 1;
        }
        let g = groups
            .entry((
                kind,
                ca.environment.clone(),
                ca.subject.clone(),
                cb.environment.clone(),
                cb.subject.clone(),
            ))
            .or_insert_with(|| PairGroup {
                kind,
                from_environment: ca.environment.clone(),
                to_environment: cb.environment.clone(),
                from_subject: ca.subject.clone(),
                to_subject: cb.subject.clone(),
                from_observed: BTreeMap::new(),
                to_observed: BTreeMap::new(),
                scenarios: Vec::new(),
                to_message: None,
            });
        *g.from_observed.entry(ca.observed.clone()).or_default() += 1;
        *g.to_observed.entry(cb.observed.clone()).or_default() += 1;
        g.scenarios
            .push(format!("{}/{}", cb.scenario_set, cb.scenario));
        if g.to_message.is_none() && !passed(cb) && !cb.message.is_empty() {
            g.to_message = Some(first_line(&cb.message));
        }
    }
    if pairs == 0 {
        return Err(SignoffError::NoPairs {
            axis: axis.into(),
            from: from.into(),
            to: to.into(),
        });
    }
    let unpaired_from = a.keys().filter(|k| !b.contains_key(*k)).count();
    let unpaired_to = b.keys().filter(|k| !a.contains_key(*k)).count();
    let mut lost_coverage: Vec<String> = skipped
        .iter()
        .map(|((backend, reason), n)| format!("{n} pairs have a SKIPped {backend} side: {reason}"))
        .collect();
    if unpaired_from > 0 {
        lost_coverage.push(format!(
            "{unpaired_from} cells with {axis}={from} have no twin with {axis}={to}"
        ));
    }
    if unpaired_to > 0 {
        lost_coverage.push(format!(
            "{unpaired_to} cells with {axis}={to} have no twin with {axis}={from}"
        ));
    }
    let n = |k: PairKind| counts.get(&k).copied().unwrap_or(0);
    let still = n(PairKind::UnchangedFail);
    let envs_of = |kind: PairKind| {
        let mut e: Vec<&str> = groups
            .values()
            .filter(|g| g.kind == kind)
            .map(|g| g.to_environment.as_str())
            .collect();
        e.sort();
        e.dedup();
        e
    };
    let top_sigs = {
        let mut v: Vec<(&String, &usize)> = remaining.iter().collect();
        v.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
        v.iter()
            .take(3)
            .map(|(s, n)| format!("{s} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (verdict, verdict_line) = if n(PairKind::Broken) > 0 {
        let envs = envs_of(PairKind::Broken);
        (
            Verdict::DoNotShip,
            format!(
                "DO NOT SHIP {axis}={to}: it breaks {} of {pairs} pairs that pass with {axis}={from} (in {}: {}), fixes {}{}",
                n(PairKind::Broken),
                envs.len(),
                abbreviate(&envs, 3),
                n(PairKind::Fixed),
                if lost_coverage.is_empty() {
                    String::new()
                } else {
                    format!("; and LOST COVERAGE: {}", lost_coverage.join("; "))
                }
            ),
        )
    } else if !lost_coverage.is_empty() {
        (
            Verdict::NoVerdict,
            format!(
                "NO VERDICT on {axis}={to}: LOST COVERAGE, the sides do not cover the same cells: {}; rerun where they run",
                lost_coverage.join("; ")
            ),
        )
    } else if n(PairKind::Inconclusive) > 0 {
        (
            Verdict::NoVerdict,
            format!(
                "NO VERDICT on {axis}={to}: {} of {pairs} pairs have no answer (ERROR or SKIP); rerun them",
                n(PairKind::Inconclusive)
            ),
        )
    } else {
        let rest = if still > 0 {
            format!(
                "; {still} pairs still fail in {} environments ({top_sigs})",
                envs_of(PairKind::UnchangedFail).len()
            )
        } else {
            String::new()
        };
        (
            Verdict::Ship,
            format!(
                "SHIP {axis}={to}: breaks none of {pairs} pairs, fixes {} in {} environments{rest}",
                n(PairKind::Fixed),
                envs_of(PairKind::Fixed).len()
            ),
        )
    };
    Ok(Signoff {
        run_name: run.run_name.clone(),
        axis: axis.into(),
        from: from.into(),
        to: to.into(),
        pairs,
        counts,
        remaining_failures: remaining,
        groups: groups.into_values().collect(),
        unpaired_from,
        unpaired_to,
        lost_coverage,
        verdict,
        verdict_line,
    })
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.chars().count() > 160 {
        format!("{}…", l.chars().take(160).collect::<String>())
    } else {
        l.to_string()
    }
}

fn abbreviate(items: &[&str], n: usize) -> String {
    let shown: Vec<String> = items.iter().take(n).map(|s| s.to_string()).collect();
    if items.len() > n {
        format!("{} and {} more", shown.join(", "), items.len() - n)
    } else {
        shown.join(", ")
    }
}

fn observed_text(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| {
            if m.len() == 1 {
                format!("`{k}`")
            } else {
                format!("`{k}` ×{v}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Signoff {
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Ship => crate::exit::OK,
            Verdict::DoNotShip => crate::exit::FAILURES,
            Verdict::NoVerdict if !self.lost_coverage.is_empty() => crate::exit::COVERAGE_LOST,
            Verdict::NoVerdict => crate::exit::ERRORS,
        }
    }

    pub fn render_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Sign-off: `{}` {} → {} (run `{}`)\n",
            self.axis, self.from, self.to, self.run_name
        );
        let _ = writeln!(md, "**{}**\n", self.verdict_line);
        let _ = writeln!(
            md,
            "{} pairs of cells that differ only in `{}` (judged on what was observed: did apply_patch work through the sandbox).\n",
            self.pairs, self.axis
        );
        let _ = writeln!(
            md,
            "| fixed | broken | unchanged-pass | unchanged-fail | inconclusive |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        let n = |k: PairKind| self.counts.get(&k).copied().unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |\n",
            n(PairKind::Fixed),
            n(PairKind::Broken),
            n(PairKind::UnchangedPass),
            n(PairKind::UnchangedFail),
            n(PairKind::Inconclusive)
        );
        if !self.remaining_failures.is_empty() {
            let _ = writeln!(
                md,
                "Still failing with {}={}, by signature:\n",
                self.axis, self.to
            );
            for (sig, n) in &self.remaining_failures {
                let remedy = crate::sandbox::signature::remedy(sig);
                if remedy.is_empty() {
                    let _ = writeln!(md, "- `{sig}`: {n} cells");
                } else {
                    let _ = writeln!(md, "- `{sig}`: {n} cells — {remedy}");
                }
            }
            md.push('\n');
        }
        for kind in [
            PairKind::Broken,
            PairKind::Fixed,
            PairKind::UnchangedFail,
            PairKind::Inconclusive,
            PairKind::UnchangedPass,
        ] {
            let gs: Vec<&PairGroup> = self.groups.iter().filter(|g| g.kind == kind).collect();
            if gs.is_empty() {
                continue;
            }
            let _ = writeln!(md, "## {} ({} pairs)\n", kind.title(), n(kind));
            let _ = writeln!(
                md,
                "| {a}={from} | {a}={to} | subject | before | after | scenarios | why (after) |",
                a = self.axis,
                from = self.from,
                to = self.to
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|");
            for g in gs {
                let subject = if g.from_subject == g.to_subject {
                    format!("`{}`", g.from_subject)
                } else {
                    format!("`{}` → `{}`", g.from_subject, g.to_subject)
                };
                let _ = writeln!(
                    md,
                    "| `{}` | `{}` | {subject} | {} | {} | {} | {} |",
                    g.from_environment,
                    g.to_environment,
                    observed_text(&g.from_observed),
                    observed_text(&g.to_observed),
                    g.scenarios.len(),
                    g.to_message
                        .as_deref()
                        .map(|m| m.replace('|', "\\|"))
                        .unwrap_or_default()
                );
            }
            md.push('\n');
        }
        if self.unpaired_from + self.unpaired_to > 0 {
            let _ = writeln!(
                md,
                "Not paired: {} cells with {a}={} and {} with {a}={} have no twin differing only in `{a}`.\n",
                self.unpaired_from,
                self.from,
                self.unpaired_to,
                self.to,
                a = self.axis
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::model::sample_cell;

    fn cell(env: &str, setuid: &str, scenario: &str, status: Status, obs: &str) -> CellResult {
        let mut c = sample_cell(
            &format!("{env}/bwrap-{setuid}/core/{scenario}"),
            status,
            obs,
        );
        c.backend = env.split('-').next().unwrap().into();
        c.axes = BTreeMap::from([
            ("env".to_string(), env.to_string()),
            ("setuid".to_string(), setuid.to_string()),
            ("scenario".to_string(), scenario.to_string()),
        ]);
        if status == Status::Skip {
            c.message = "no Docker engine".into();
        }
        c
    }

    fn run_of(cells: Vec<CellResult>) -> RunResults {
        crate::report::model::sample_run(cells)
    }

    #[test]
    fn axis_codex_pairs_codex_versions() {
        use Status::*;
        let cells: Vec<CellResult> = [
            ("0.116.0", Xfail, "capset-denied"),
            ("0.171.0", Pass, "pass"),
        ]
        .into_iter()
        .map(|(v, st, obs)| {
            let mut c = cell("docker-b", "x", "s", st, obs);
            c.axes.remove("setuid");
            c.axes.insert("version".into(), v.into());
            c
        })
        .collect();
        let s = signoff(&run_of(cells), "codex", "0.116.0", "0.171.0").unwrap();
        assert_eq!(s.pairs, 1);
        assert_eq!(s.counts.get(&PairKind::Fixed), Some(&1));
    }

    #[test]
    fn ship_only_when_both_sides_cover_the_same_cells() {
        use Status::*;
        let full = vec![
            cell("host-a", "false", "x", Xfail, "userns-denied"),
            cell("host-a", "true", "x", Pass, "pass"),
            cell("docker-b", "false", "x", Xfail, "userns-denied"),
            cell("docker-b", "true", "x", Pass, "pass"),
        ];
        let s = signoff(&run_of(full.clone()), "setuid", "false", "true").unwrap();
        assert_eq!(s.verdict, Verdict::Ship, "{}", s.verdict_line);
        assert!(s.lost_coverage.is_empty());
        assert_eq!(s.exit_code(), crate::exit::OK);

        // The Docker engine died: the docker pairs have SKIPped sides. No SHIP, exit 4, and
        // the line names what was lost.
        let mut dead = full.clone();
        dead[2] = cell("docker-b", "false", "x", Skip, "skip");
        dead[3] = cell("docker-b", "true", "x", Skip, "skip");
        let s = signoff(&run_of(dead), "setuid", "false", "true").unwrap();
        assert_eq!(s.verdict, Verdict::NoVerdict);
        assert_eq!(s.exit_code(), crate::exit::COVERAGE_LOST);
        assert!(
            s.verdict_line
                .contains("LOST COVERAGE, the sides do not cover the same cells: 1 pairs have a SKIPped docker side: no Docker engine"),
            "{}",
            s.verdict_line
        );

        // A cell without a twin: the sides differ, no SHIP.
        let mut lopsided = full.clone();
        lopsided.push(cell("host-a", "false", "y", Pass, "pass"));
        let s = signoff(&run_of(lopsided), "setuid", "false", "true").unwrap();
        assert_eq!(s.verdict, Verdict::NoVerdict);
        assert!(
            s.verdict_line
                .contains("1 cells with setuid=false have no twin with setuid=true"),
            "{}",
            s.verdict_line
        );

        // A broken pair still says DO NOT SHIP first.
        let mut broken = full;
        broken[1] = cell("host-a", "true", "x", Fail, "capset-denied");
        broken[0] = cell("host-a", "false", "x", Pass, "pass");
        broken[3] = cell("docker-b", "true", "x", Skip, "skip");
        let s = signoff(&run_of(broken), "setuid", "false", "true").unwrap();
        assert_eq!(s.verdict, Verdict::DoNotShip);
    }
}
