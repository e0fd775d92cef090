//! Reports: one result model, many renderers (JUnit, Markdown, JSON), written together.

pub mod coverage;
pub mod diff;
pub mod heatmap;
pub mod hints;
pub mod junit;
pub mod load;
pub mod markdown;
pub mod merge;
pub mod model;
pub mod signoff;
pub mod timeline;

use std::path::Path;

use anyhow::{Context, Result};

pub use model::{CellResult, RunResults, Status};

/// Write `results.json`, `junit.xml`, `report.md`, `heatmap.svg` and (for a run that
/// dispatched batches) `timeline.svg` into `dir`, with the
/// changes against a baseline (`diff.md`, `diff.json`, the top of
/// `report.md`, the heat map's marks) when one is given.
pub fn write_all_with(run: &RunResults, dir: &Path, baseline: Option<&diff::Diff>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let w = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("failed to write {}", p.display()))
    };
    w(
        "results.json",
        serde_json::to_string_pretty(run).expect("results serialise") + "\n",
    )?;
    w("junit.xml", junit::render(run))?;
    let changed = baseline.map(|d| d.changed_groups()).unwrap_or_default();
    w(heatmap::FILE_NAME, heatmap::render(run, &changed))?;
    let timeline = run.timeline.as_ref().filter(|t| !t.spans.is_empty());
    if let Some(t) = timeline {
        w(timeline::FILE_NAME, timeline::render(t, run.duration_ms))?;
    }
    if let Some(d) = baseline {
        w("diff.md", d.render_markdown())?;
        w(
            "diff.json",
            serde_json::to_string_pretty(d).expect("diff serialises") + "\n",
        )?;
    }
    w(
        "report.md",
        markdown::render_with(
            run,
            &markdown::Extras {
                baseline,
                heatmap: Some(heatmap::FILE_NAME),
                timeline: timeline.map(|_| timeline::FILE_NAME),
            },
        ),
    )?;
    Ok(())
}

/// `2026-11-26T17:32:38Z` for now (UTC), without a date library.
pub fn timestamp_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// A run name from the time: `20261126-173238`.
pub fn run_name_now() -> String {
    let t = timestamp_utc();
    format!(
        "{}-{}",
        t[..10].replace('-', ""),
        t[11..19].replace(':', "")
    )
}

/// Unix seconds → (year, month, day, hour, minute, second), proleptic Gregorian, UTC.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// The exit code of a run from its cells' statuses and whether a requirement was broken:
/// FAIL/XPASS (1) before lost coverage (4) before ERROR (3).
pub fn for_run<'a>(statuses: impl IntoIterator<Item = &'a Status>, coverage_lost: bool) -> u8 {
    match for_statuses(statuses) {
        crate::exit::FAILURES => crate::exit::FAILURES,
        _ if coverage_lost => crate::exit::COVERAGE_LOST,
        code => code,
    }
}

/// The exit code of a run from its cells' statuses.
pub fn for_statuses<'a>(statuses: impl IntoIterator<Item = &'a Status>) -> u8 {
    let mut code = crate::exit::OK;
    for s in statuses {
        match s {
            Status::Fail | Status::Xpass => return crate::exit::FAILURES,
            Status::Error => code = crate::exit::ERRORS,
            Status::Pass | Status::Xfail | Status::Skip => {}
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(1_795_714_358), (2026, 11, 26, 17, 32, 38));
    }
}
