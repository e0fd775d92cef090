//! What the terminal shows during a run: an overall bar with counts by status and an ETA plus
//! a line per running batch, or plain lines per cell when stdout is not a terminal, under CI,
//! or with `--quiet`. A pure choice of [`Mode`] from those facts, then one [`Progress`].

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::{CellResult, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Lines,
}

/// Bars only on an interactive terminal outside CI and without `--quiet`.
pub fn mode(is_terminal: bool, is_ci: bool, quiet: bool) -> Mode {
    if is_terminal && !is_ci && !quiet {
        Mode::Bars
    } else {
        Mode::Lines
    }
}

pub fn detect_mode(quiet: bool) -> Mode {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    mode(std::io::stdout().is_terminal(), ci, quiet)
}

pub struct Progress {
    mode: Mode,
    multi: MultiProgress,
    overall: ProgressBar,
    batches: BTreeMap<String, ProgressBar>,
    counts: BTreeMap<Status, usize>,
}

impl Progress {
    pub fn new(mode: Mode, total: usize) -> Self {
        let multi = MultiProgress::with_draw_target(match mode {
            Mode::Bars => ProgressDrawTarget::stdout(),
            Mode::Lines => ProgressDrawTarget::hidden(),
        });
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} cells  {msg}  [{elapsed_precise}, eta {eta}]",
            )
            .expect("valid template")
            .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        overall.enable_steady_tick(Duration::from_millis(250));
        Progress {
            mode,
            multi,
            overall,
            batches: BTreeMap::new(),
            counts: BTreeMap::new(),
        }
    }

    /// A line printed above the bars (or plainly).
    pub fn println(&self, line: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(line);
            }
            Mode::Lines => println!("{line}"),
        }
    }

    pub fn batch_stage(&mut self, batch: &str, stage: &str) {
        if self.mode == Mode::Lines {
            return;
        }
        let bar = self.batches.entry(batch.to_string()).or_insert_with(|| {
            let b = self.multi.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("  {spinner} {prefix}: {msg} ({elapsed})")
                    .expect("valid template"),
            );
            b.set_prefix(batch.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        bar.set_message(stage.to_string());
    }

    pub fn batch_done(&mut self, batch: &str) {
        if let Some(b) = self.batches.remove(batch) {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
    }

    pub fn cell(&mut self, r: &CellResult) {
        *self.counts.entry(r.status).or_default() += 1;
        let sig = r
            .signature
            .as_deref()
            .map(|s| format!("  [{s}]"))
            .unwrap_or_default();
        let show = self.mode == Mode::Lines || !r.status.is_ok();
        if show {
            self.println(&format!(
                "{:<5} {:>6}ms  {}{sig}",
                r.status.as_str(),
                r.duration_ms,
                r.id
            ));
        }
        if let Some(b) = self.batches.get(&r.environment) {
            b.set_message(format!("{} {}", r.status.as_str(), r.scenario));
        }
        self.overall.inc(1);
        self.overall.set_message(self.summary());
    }

    pub fn summary(&self) -> String {
        Status::ALL
            .iter()
            .filter_map(|s| {
                self.counts
                    .get(s)
                    .filter(|n| **n > 0)
                    .map(|n| format!("{} {n}", s.as_str()))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn finish(&mut self) {
        for (_, b) in std::mem::take(&mut self.batches) {
            b.finish_and_clear();
        }
        self.overall.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_is_a_pure_function() {
        assert_eq!(mode(true, false, false), Mode::Bars);
        assert_eq!(mode(true, true, false), Mode::Lines);
        assert_eq!(mode(true, false, true), Mode::Lines);
        assert_eq!(mode(false, false, false), Mode::Lines);
    }
}
