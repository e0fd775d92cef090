//! `report.md`: totals, a grid per scenario set (environments × subjects), then every
//! unexpected result with its signature and remedy, then the expected failures by signature.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::diff::Diff;
use super::model::{CellResult, RunResults, Status};

/// What `report.md` shows beyond the run itself.
#[derive(Default)]
pub struct Extras<'a> {
    /// Changes against a baseline: the first section of the report.
    pub baseline: Option<&'a Diff>,
    /// The heat map's file name, next to report.md.
    pub heatmap: Option<&'a str>,
    /// The timeline's file name, next to report.md (a run that dispatched batches).
    pub timeline: Option<&'a str>,
}

pub fn render_with(run: &RunResults, extras: &Extras) -> String {
    let mut md = String::new();
    let counts = run.counts();
    let _ = writeln!(md, "# nsmatrix run `{}`\n", run.run_name);
    // Coverage first: what did not run is part of the result, never a footnote.
    md.push_str(&super::coverage::render_markdown(run));
    if let Some(d) = extras.baseline {
        md.push_str(&d.render_markdown());
    }
    let _ = writeln!(
        md,
        "Matrix `{}`, started {}, took {:.1} s on kernel `{}`.{}\n",
        run.matrix,
        run.started,
        run.duration_ms as f64 / 1000.0,
        run.host
            .get("kernel.osrelease")
            .map(String::as_str)
            .unwrap_or("?"),
        run.interrupted
            .as_ref()
            .map(|r| format!(" **The run was stopped early: {r}.**"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        md,
        "| cells | {} |",
        Status::ALL.map(|s| s.as_str()).join(" | ")
    );
    let _ = writeln!(md, "|---|{}|", Status::ALL.map(|_| "---").join("|"));
    let _ = writeln!(
        md,
        "| {} | {} |\n",
        run.cells.len(),
        Status::ALL
            .map(|s| counts.get(&s).copied().unwrap_or(0).to_string())
            .join(" | ")
    );
    let _ = writeln!(
        md,
        "Legend: ✅ pass · ✅ˣ expected failure seen (XFAIL) · ❌ FAIL · ❌⁺ passed but expected to fail (XPASS) · ⚠ ERROR (harness) · ⏭ SKIP. \
         A grid cell counts the scenarios of the set; its signature is the most common one.\n"
    );
    if let Some(shard) = &run.shard {
        let _ = writeln!(
            md,
            "This is shard {}/{} of the matrix; `nsmatrix merge` combines the shards.\n",
            shard.index, shard.count
        );
    }
    if let Some(file) = extras.heatmap {
        let _ = writeln!(
            md,
            "![heat map: environments × subjects, coloured by the worst status of their cells{}]({file})\n",
            if extras.baseline.is_some() {
                "; outlined where something changed against the baseline"
            } else {
                ""
            }
        );
    }

    let mut sets: Vec<&str> = Vec::new();
    for c in &run.cells {
        if !sets.contains(&c.scenario_set.as_str()) {
            sets.push(&c.scenario_set);
        }
    }
    for set in sets {
        let cells: Vec<&CellResult> = run.cells.iter().filter(|c| c.scenario_set == set).collect();
        let mut envs: Vec<&str> = Vec::new();
        let mut subjects: Vec<&str> = Vec::new();
        for c in &cells {
            if !envs.contains(&c.environment.as_str()) {
                envs.push(&c.environment);
            }
            if !subjects.contains(&c.subject.as_str()) {
                subjects.push(&c.subject);
            }
        }
        let _ = writeln!(md, "## Scenario set `{set}`\n");
        let _ = writeln!(
            md,
            "| environment | {} |",
            subjects
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(
            md,
            "|---|{}|",
            subjects.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        );
        for env in &envs {
            let row: Vec<String> = subjects
                .iter()
                .map(|s| {
                    grid_cell(
                        cells
                            .iter()
                            .filter(|c| c.environment == *env && c.subject == *s)
                            .copied(),
                    )
                })
                .collect();
            let _ = writeln!(md, "| `{env}` | {} |", row.join(" | "));
        }
        md.push('\n');
    }

    let bad: Vec<&CellResult> = run.cells.iter().filter(|c| !c.status.is_ok()).collect();
    if !bad.is_empty() {
        let _ = writeln!(md, "## Unexpected results ({})\n", bad.len());
        for c in bad {
            let _ = writeln!(md, "### {} `{}`\n", c.status.as_str(), c.id);
            let _ = writeln!(md, "- expected: {}", expectation_text(c));
            let _ = writeln!(
                md,
                "- observed: `{}` — {}",
                c.observed,
                one_line(&c.message)
            );
            if let Some(r) = &c.remedy {
                let _ = writeln!(md, "- remedy: {r}");
            }
            if !c.stderr_tail.trim().is_empty() {
                let _ = writeln!(
                    md,
                    "\n```text\n{}\n```",
                    last_lines(&c.stderr_tail, 8).replace("```", "`\u{200B}``")
                );
            }
            if let Some(k) = c.details.get("kernel.log") {
                let _ = writeln!(
                    md,
                    "\nkernel log while it ran:\n\n```text\n{}\n```",
                    last_lines(k, 8).replace("```", "`\u{200B}``")
                );
            }
            md.push('\n');
        }
    }

    kernel_evidence(&mut md, run);
    apparmor_remedy(&mut md, run);

    let flaky: Vec<&CellResult> = run.cells.iter().filter(|c| c.flaky).collect();
    if !flaky.is_empty() {
        let _ = writeln!(
            md,
            "## Flaky cells ({}): the status differed across {} repeats\n",
            flaky.len(),
            run.repeat
        );
        let _ = writeln!(
            md,
            "Each counts with its worst repeat in the totals above.\n\n| cell | repeats |\n|---|---|"
        );
        for c in flaky {
            let reps: Vec<String> = c
                .repeats
                .iter()
                .map(|r| match &r.signature {
                    Some(s) => format!("{} `{s}`", r.status.as_str()),
                    None => r.status.as_str().to_string(),
                })
                .collect();
            let _ = writeln!(md, "| `{}` | {} |", c.id, reps.join(" · "));
        }
        md.push('\n');
    }

    let mut xfail: BTreeMap<&str, Vec<&CellResult>> = BTreeMap::new();
    for c in run.cells.iter().filter(|c| c.status == Status::Xfail) {
        xfail
            .entry(c.signature.as_deref().unwrap_or("?"))
            .or_default()
            .push(c);
    }
    if !xfail.is_empty() {
        let _ = writeln!(md, "## Expected failures, by signature\n");
        let _ = writeln!(md, "| signature | cells | environments | remedy |");
        let _ = writeln!(md, "|---|---|---|---|");
        for (sig, cs) in xfail {
            let mut envs: Vec<&str> = cs.iter().map(|c| c.environment.as_str()).collect();
            envs.dedup();
            envs.sort();
            envs.dedup();
            let _ = writeln!(
                md,
                "| `{sig}` | {} | {} | {} |",
                cs.len(),
                envs.iter()
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                crate::sandbox::signature::remedy(sig)
            );
        }
        md.push('\n');
    }

    let codex: Vec<&CellResult> = run
        .cells
        .iter()
        .filter(|c| c.details.contains_key("codex.bwrap"))
        .collect();
    if !codex.is_empty() {
        let _ = writeln!(md, "## Which bwrap Codex used\n");
        let _ = writeln!(
            md,
            "Observed in /proc while Codex ran (\"not observed\" when bwrap ended before it could be seen).\n"
        );
        let _ = writeln!(
            md,
            "| Codex version | environment | bwrap used | setuid in effect | results |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        // Codex version × environment, versions in release order.
        let version_key = |v: &str| -> Vec<u64> {
            v.split(['.', '-'])
                .map(|p| p.parse().unwrap_or(u64::MAX))
                .collect()
        };
        let mut groups: BTreeMap<(Vec<u64>, String, String), Vec<&CellResult>> = BTreeMap::new();
        for c in codex {
            let version = c
                .details
                .get("codex.version")
                .or_else(|| c.axes.get("version"))
                .cloned()
                .unwrap_or_else(|| c.subject.clone());
            // The image's own Codex and nsmatrix's pinned one of the same release are apart.
            let label = if c.axes.get("kind").map(String::as_str) == Some("image-codex") {
                format!("{version} (the image's own)")
            } else {
                version.clone()
            };
            groups
                .entry((version_key(&version), label, c.environment.clone()))
                .or_default()
                .push(c);
        }
        for ((_, version, env), cs) in groups {
            // Each cell's sequence of bwraps, a repeat of the same one shown once.
            let mut used: Vec<String> = cs
                .iter()
                .filter_map(|c| c.details.get("codex.bwrap"))
                .map(|u| {
                    let mut steps: Vec<&str> = u.split(" then ").collect();
                    steps.dedup();
                    steps.join(" then ")
                })
                .collect();
            used.sort();
            used.dedup();
            let used: Vec<&str> = used.iter().map(String::as_str).collect();
            let observed: Vec<&str> = used
                .iter()
                .copied()
                .filter(|u| !u.starts_with("not observed"))
                .collect();
            let shown = if observed.is_empty() {
                used.clone()
            } else {
                observed
            };
            let suid: Vec<&str> = cs
                .iter()
                .filter_map(|c| {
                    c.details
                        .get("codex.bwrap-setuid-effective")
                        .map(String::as_str)
                })
                .collect();
            let suid = if suid.contains(&"true") {
                "yes"
            } else if suid.is_empty() {
                "—"
            } else {
                "no"
            };
            let _ = writeln!(
                md,
                "| {version} | `{env}` | {} | {suid} | {} |",
                shown.join("; "),
                grid_cell(cs.iter().copied())
            );
        }
        md.push('\n');
    }

    let hints = super::hints::one_axis_fixes(&run.cells);
    if !hints.is_empty() {
        let _ = writeln!(md, "## One change that makes it pass\n");
        let _ = writeln!(
            md,
            "For each failing environment × subject, the combinations that differ in exactly one axis and passed every scenario in this run.\n"
        );
        let _ = writeln!(md, "| environment / subject | fails with | passes with |");
        let _ = writeln!(md, "|---|---|---|");
        for h in hints {
            let fixes = if h.fixes.is_empty() {
                "— (no single change in this run)".to_string()
            } else {
                h.fixes
                    .iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(md, "| `{}` | `{}` | {fixes} |", h.group, h.signature);
        }
        md.push('\n');
    }

    let skipped: Vec<&CellResult> = run
        .cells
        .iter()
        .filter(|c| c.status == Status::Skip)
        .collect();
    if !skipped.is_empty() {
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for c in skipped {
            *reasons.entry(c.message.as_str()).or_default() += 1;
        }
        let _ = writeln!(md, "## Skipped\n");
        for (r, n) in reasons {
            let _ = writeln!(md, "- {n} cell(s): {r}");
        }
        md.push('\n');
    }
    if let (Some(file), Some(t)) = (extras.timeline, &run.timeline) {
        render_timeline(&mut md, t, run.duration_ms, file);
    }
    md
}

/// "Where the time went": the schedule's summary, each backend's part, the slowest batches.
fn render_timeline(md: &mut String, t: &super::timeline::Timeline, run_ms: u64, file: &str) {
    let _ = writeln!(
        md,
        "## Where the time went
"
    );
    let _ = writeln!(
        md,
        "![timeline: one lane per job slot, each batch a bar split into its stages]({file})\n"
    );
    let _ = writeln!(md, "{}.\n", super::timeline::summary(t, run_ms));
    let parts: Vec<String> = t
        .parts()
        .into_iter()
        .map(|(b, start, end)| {
            format!(
                "{b} {:.1} s (from {:.1} s)",
                end.saturating_sub(start) as f64 / 1000.0,
                start as f64 / 1000.0
            )
        })
        .collect();
    if !parts.is_empty() {
        let _ = writeln!(
            md,
            "Parts, first batch's start to last one's end: {}.\n",
            parts.join(", ")
        );
    }
    let _ = writeln!(md, "Slowest batches:\n");
    for s in t.slowest(5) {
        let _ = writeln!(md, "- `{}`", super::timeline::span_title(s));
    }
    md.push('\n');
}

fn grid_cell<'a>(cells: impl Iterator<Item = &'a CellResult>) -> String {
    let cells: Vec<&CellResult> = cells.collect();
    if cells.is_empty() {
        return "—".into();
    }
    let mut by: BTreeMap<Status, usize> = BTreeMap::new();
    let mut sigs: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ms = 0u64;
    for c in &cells {
        *by.entry(c.status).or_default() += 1;
        if let Some(s) = &c.signature {
            *sigs.entry(s.as_str()).or_default() += 1;
        }
        ms += c.duration_ms;
    }
    let parts: Vec<String> = by
        .iter()
        .map(|(s, n)| format!("{} {n}", s.mark()))
        .collect();
    let sig = sigs
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, _)| format!(" `{s}`"))
        .unwrap_or_default();
    format!("{}{sig} ({:.2} s)", parts.join(" "), ms as f64 / 1000.0)
}

fn expectation_text(c: &CellResult) -> String {
    match &c.expected {
        crate::matrix::model::Expectation::Pass => "pass".into(),
        crate::matrix::model::Expectation::Fail { signature, reason } => match reason {
            Some(r) => format!("fail with `{signature}` ({r})"),
            None => format!("fail with `{signature}`"),
        },
    }
}

/// Every cell whose guest kernel logged something about its sandbox (AppArmor's decisions,
/// `Mount too revealing`, seccomp's audit lines), whatever its status: the evidence behind a
/// security module's signature.
fn kernel_evidence(md: &mut String, run: &RunResults) {
    let cells: Vec<&CellResult> = run
        .cells
        .iter()
        .filter(|c| c.details.contains_key("kernel.log"))
        .collect();
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(md, "## What the guests' kernels logged ({})\n", cells.len());
    let _ = writeln!(
        md,
        "The lines a QEMU guest's kernel logged while the cell ran that concern its sandbox.\n"
    );
    let _ = writeln!(md, "| cell | status | signature | kernel log |");
    let _ = writeln!(md, "|---|---|---|---|");
    for c in cells {
        let log: Vec<String> = c.details["kernel.log"]
            .lines()
            .map(|l| format!("`{}`", l.replace('|', "\\|").replace('`', "'")))
            .collect();
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} |",
            c.id,
            c.status.as_str(),
            c.signature
                .as_deref()
                .map(|s| format!("`{s}`"))
                .unwrap_or_else(|| "—".into()),
            log.join("<br>")
        );
    }
    md.push('\n');
}

/// Whether a bwrap-userns-restrict policy fixes Codex with `/usr/bin/bwrap` but not with its
/// bundled bwrap: per AppArmor policy set, the Codex cells with the system's bwrap visible and
/// hidden, and what they show.
fn apparmor_remedy(md: &mut String, run: &RunResults) {
    // (policy set, bwrap Codex could see) → results.
    let mut groups: BTreeMap<(String, bool), Vec<&CellResult>> = BTreeMap::new();
    for c in &run.cells {
        if let (Some(set), Some("codex")) = (
            c.axes.get("apparmor"),
            c.axes.get("kind").map(String::as_str),
        ) {
            if c.status == Status::Skip {
                continue;
            }
            let hidden = c.axes.get("system-bwrap").map(String::as_str) == Some("hidden");
            groups.entry((set.clone(), hidden)).or_default().push(c);
        }
    }
    if !groups.keys().any(|(_, hidden)| *hidden) {
        return;
    }
    let _ = writeln!(md, "## AppArmor policy sets and the bwrap Codex runs\n");
    let _ = writeln!(
        md,
        "Codex with `/usr/bin/bwrap` (which it picks first) and with it hidden (so it runs its bundled `codex-resources/bwrap`), per policy set loaded in the guest.\n"
    );
    let _ = writeln!(
        md,
        "| AppArmor policy set | Codex with /usr/bin/bwrap | Codex with its bundled bwrap |"
    );
    let _ = writeln!(md, "|---|---|---|");
    let mut sets: Vec<&String> = groups.keys().map(|(s, _)| s).collect();
    sets.dedup();
    let summary = |cs: Option<&Vec<&CellResult>>| match cs {
        None => "—".to_string(),
        Some(cs) => grid_cell(cs.iter().copied()),
    };
    let passed = |cs: Option<&Vec<&CellResult>>| {
        cs.is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.observed == "pass"))
    };
    let mut verdicts = Vec::new();
    for set in sets {
        let system = groups.get(&(set.clone(), false));
        let bundled = groups.get(&(set.clone(), true));
        let _ = writeln!(
            md,
            "| `{set}` | {} | {} |",
            summary(system),
            summary(bundled)
        );
        if set.contains("bwrap-userns-restrict") && system.is_some() && bundled.is_some() {
            verdicts.push(match (passed(system), passed(bundled)) {
                (true, false) => format!(
                    "Under `{set}` the remedy profile fixes Codex running /usr/bin/bwrap but not Codex running its bundled bwrap."
                ),
                (true, true) => format!(
                    "Under `{set}` Codex passes with either bwrap: the remedy profile was not needed for the bundled one here."
                ),
                (false, _) => format!(
                    "Under `{set}` the remedy profile does not even fix Codex running /usr/bin/bwrap."
                ),
            });
        }
    }
    md.push('\n');
    for v in verdicts {
        let _ = writeln!(md, "{v}\n");
    }
}

fn one_line(s: &str) -> String {
    let s = s.replace('\n', " ⏎ ");
    if s.chars().count() > 400 {
        format!("{}…", s.chars().take(400).collect::<String>())
    } else {
        s
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::model::{sample_cell, sample_run};

    fn codex(
        set: &str,
        hidden: bool,
        status: Status,
        observed: &str,
        log: Option<&str>,
    ) -> CellResult {
        let subject = if hidden { "codex-bundled" } else { "codex" };
        let mut c = sample_cell(
            &format!("q-aa-{set}/{subject}/smoke/add_file"),
            status,
            observed,
        );
        c.axes.insert("apparmor".into(), set.into());
        c.axes.insert("kind".into(), "codex".into());
        c.axes.insert(
            "system-bwrap".into(),
            if hidden { "hidden" } else { "visible" }.into(),
        );
        if let Some(l) = log {
            c.details.insert("kernel.log".into(), l.into());
        }
        c
    }

    const LINE: &str = "audit: type=1400 audit(1.2:3): apparmor=\"DENIED\" operation=\"capable\" class=\"cap\" profile=\"nsmatrix-unprivileged-userns\" comm=\"3\" capability=21  capname=\"sys_admin\"";

    #[test]
    fn the_kernel_log_and_the_remedy_against_the_bundled_bwrap_are_reported() {
        let set = "ubuntu-like+bwrap-userns-restrict";
        let run = sample_run(vec![
            codex(set, false, Status::Pass, "pass", None),
            codex(
                set,
                true,
                Status::Xfail,
                "userns-denied-apparmor",
                Some(LINE),
            ),
            codex("none", false, Status::Pass, "pass", None),
            codex("none", true, Status::Pass, "pass", None),
        ]);
        let md = render_with(&run, &Default::default());
        assert!(
            md.contains("## What the guests' kernels logged (1)"),
            "{md}"
        );
        assert!(md.contains("capname=\"sys_admin\""), "{md}");
        assert!(
            md.contains("## AppArmor policy sets and the bwrap Codex runs"),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "Under `{set}` the remedy profile fixes Codex running /usr/bin/bwrap but not Codex running its bundled bwrap."
            )),
            "{md}"
        );

        // What the measurement says, whatever it is.
        let run = sample_run(vec![
            codex(set, false, Status::Pass, "pass", None),
            codex(set, true, Status::Pass, "pass", None),
        ]);
        let md = render_with(&run, &Default::default());
        assert!(md.contains("Codex passes with either bwrap"), "{md}");

        // No AppArmor axis: neither section.
        let md = render_with(
            &sample_run(vec![sample_cell("h/codex/smoke/a", Status::Pass, "pass")]),
            &Default::default(),
        );
        assert!(!md.contains("kernels logged") && !md.contains("AppArmor policy sets"));
    }
}
