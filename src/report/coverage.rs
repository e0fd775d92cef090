//! Coverage is part of the result: which cells did not run, grouped by backend and reason
//! ([`skips_by_reason`]), and which of those break the run's requirement ([`lost_required`]:
//! a SKIPped cell of a backend named in `[settings] require` or `run --require`).
//!
//! A SKIP never fails the product, but a run that measured nothing must not look green: the
//! summary line, report.md and junit.xml show the SKIPs first, and a broken requirement exits
//! with [`crate::exit::COVERAGE_LOST`].

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::model::{RunResults, Status};

/// SKIPped cells of one backend that share a reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SkipGroup {
    pub backend: String,
    pub reason: String,
    pub cells: usize,
    /// The backend is required by the run: these cells are lost coverage.
    pub required: bool,
}

/// Every SKIP of `run`, grouped by backend and reason, most cells first.
pub fn skips_by_reason(run: &RunResults) -> Vec<SkipGroup> {
    let mut groups: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for c in run.cells.iter().filter(|c| c.status == Status::Skip) {
        *groups
            .entry((c.backend.as_str(), c.message.as_str()))
            .or_default() += 1;
    }
    let mut out: Vec<SkipGroup> = groups
        .into_iter()
        .map(|((backend, reason), cells)| SkipGroup {
            backend: backend.to_string(),
            reason: reason.to_string(),
            cells,
            required: run.require.iter().any(|r| r == backend),
        })
        .collect();
    out.sort_by(|a, b| {
        b.cells
            .cmp(&a.cells)
            .then_with(|| a.backend.cmp(&b.backend))
    });
    out
}

/// The SKIP groups that break the run's requirement.
pub fn lost_required(run: &RunResults) -> Vec<SkipGroup> {
    skips_by_reason(run)
        .into_iter()
        .filter(|g| g.required)
        .collect()
}

/// One line naming the lost coverage: `LOST COVERAGE: 864 docker cells SKIPped (required):
/// Docker engine unreachable ...`; empty when no requirement is broken.
pub fn lost_line(run: &RunResults) -> String {
    let lost = lost_required(run);
    if lost.is_empty() {
        return String::new();
    }
    let total: usize = lost.iter().map(|g| g.cells).sum();
    let parts: Vec<String> = lost
        .iter()
        .map(|g| format!("{} {} cells: {}", g.cells, g.backend, short(&g.reason)))
        .collect();
    format!(
        "LOST COVERAGE: {total} cells of required backends ({}) were SKIPped: {}",
        run.require.join(", "),
        parts.join("; ")
    )
}

/// What the summary line adds after the counts: the SKIPs by backend and reason, then the
/// lost coverage. Empty when nothing was skipped.
pub fn summary_suffix(run: &RunResults) -> String {
    let groups = skips_by_reason(run);
    if groups.is_empty() {
        return String::new();
    }
    let lost = lost_line(run);
    let parts: Vec<String> = groups
        .iter()
        .map(|g| format!("{} {}: {}", g.cells, g.backend, short(&g.reason)))
        .collect();
    let mut s = format!(" (SKIP by reason: {})", parts.join("; "));
    if !lost.is_empty() {
        s.push_str(" — ");
        s.push_str(&lost);
    }
    s
}

/// The `## Coverage` section at the top of report.md: what did not run and why.
pub fn render_markdown(run: &RunResults) -> String {
    let groups = skips_by_reason(run);
    let mut md = String::new();
    let required = if run.require.is_empty() {
        "no backend is required".to_string()
    } else {
        format!("required backends: {}", run.require.join(", "))
    };
    if groups.is_empty() {
        let _ = writeln!(
            md,
            "## Coverage\n\nEvery cell ran: nothing was SKIPped ({required}).\n"
        );
        return md;
    }
    let skipped: usize = groups.iter().map(|g| g.cells).sum();
    let lost = lost_line(run);
    let _ = writeln!(md, "## Coverage\n");
    if lost.is_empty() {
        let _ = writeln!(
            md,
            "{skipped} of {} cells did not run ({required}); a SKIP is lost coverage, not success.\n",
            run.cells.len()
        );
    } else {
        let _ = writeln!(md, "**{lost}.** ({required})\n");
    }
    let _ = writeln!(md, "| backend | SKIPped cells | required | reason |");
    let _ = writeln!(md, "|---|---|---|---|");
    for g in &groups {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} |",
            g.backend,
            g.cells,
            if g.required { "**yes**" } else { "no" },
            g.reason.replace('|', "\\|").replace('\n', " ")
        );
    }
    md.push('\n');
    md
}

fn short(reason: &str) -> String {
    let l = reason.lines().next().unwrap_or("");
    if l.chars().count() > 140 {
        format!("{}…", l.chars().take(140).collect::<String>())
    } else {
        l.to_string()
    }
}

// The run's summary line and exit code depend on its coverage, so they live beside it (the
// result model itself knows nothing of coverage).
impl RunResults {
    /// `12 PASS, 0 FAIL, 3 XFAIL, 0 XPASS, 0 ERROR, 1 SKIP`, then the SKIPs by backend and
    /// reason and, when a requirement is broken, `LOST COVERAGE` naming it.
    pub fn summary_line(&self) -> String {
        let counts = self.counts();
        let mut line = Status::ALL
            .iter()
            .map(|s| format!("{} {}", counts.get(s).copied().unwrap_or(0), s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        line.push_str(&summary_suffix(self));
        line
    }

    pub fn exit_code(&self) -> u8 {
        super::for_run(
            self.cells.iter().map(|c| &c.status),
            !lost_required(self).is_empty(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;
    use crate::report::model::sample_cell;

    fn run_of(cells: Vec<crate::report::CellResult>, require: &[&str]) -> RunResults {
        RunResults {
            require: require.iter().map(|s| s.to_string()).collect(),
            ..crate::report::model::sample_run(cells)
        }
    }

    fn skip(id: &str, backend: &str, reason: &str) -> crate::report::CellResult {
        let mut c = sample_cell(id, Status::Skip, "skip");
        c.backend = backend.into();
        c.signature = None;
        c.message = reason.into();
        c
    }

    #[test]
    fn a_skip_of_a_required_backend_is_lost_coverage_and_exits_4() {
        let cells = vec![
            sample_cell("h/s/core/a", Status::Pass, "pass"),
            skip("d1/s/core/a", "docker", "no Docker engine"),
            skip("d2/s/core/a", "docker", "no Docker engine"),
            skip("q/s/core/a", "qemu", "no qemu"),
        ];
        // Nothing required: the SKIPs are shown but the run is green.
        let free = run_of(cells.clone(), &[]);
        assert_eq!(free.exit_code(), exit::OK);
        assert!(lost_required(&free).is_empty());
        let line = free.summary_line();
        assert!(
            line.contains("SKIP by reason: 2 docker: no Docker engine; 1 qemu: no qemu"),
            "{line}"
        );
        assert!(!line.contains("LOST COVERAGE"), "{line}");
        // Docker required: exit 4, and the line names what was lost.
        let req = run_of(cells.clone(), &["host", "docker"]);
        assert_eq!(req.exit_code(), exit::COVERAGE_LOST);
        let line = req.summary_line();
        assert!(
            line.contains("LOST COVERAGE: 2 cells of required backends (host, docker)"),
            "{line}"
        );
        assert!(line.contains("2 docker cells: no Docker engine"), "{line}");
        let md = render_markdown(&req);
        assert!(
            md.contains("| `docker` | 2 | **yes** | no Docker engine |"),
            "{md}"
        );
        assert!(md.contains("| `qemu` | 1 | no | no qemu |"), "{md}");
        // A FAIL still wins over lost coverage; lost coverage wins over ERROR.
        let mut failing = cells.clone();
        failing.push(sample_cell("h/s/core/b", Status::Fail, "userns-denied"));
        assert_eq!(run_of(failing, &["docker"]).exit_code(), exit::FAILURES);
        let mut erring = cells;
        erring.push(sample_cell("h/s/core/c", Status::Error, "error"));
        assert_eq!(
            run_of(erring.clone(), &["docker"]).exit_code(),
            exit::COVERAGE_LOST
        );
        assert_eq!(run_of(erring, &[]).exit_code(), exit::ERRORS);
    }

    #[test]
    fn a_run_that_skipped_nothing_says_so() {
        let run = run_of(
            vec![sample_cell("h/s/core/a", Status::Pass, "pass")],
            &["host"],
        );
        assert_eq!(
            run.summary_line(),
            "1 PASS, 0 FAIL, 0 XFAIL, 0 XPASS, 0 ERROR, 0 SKIP"
        );
        assert!(render_markdown(&run).contains("Every cell ran"));
    }
}
