//! [`Recorder`]: where each result goes the moment it is known.

use std::io::Write;

use anyhow::{Context, Result};

use crate::progress::Progress;
use crate::report::model::CellResult;

/// Where results go as they are known: `results.jsonl`, the progress display, the list.
pub(crate) struct Recorder {
    jsonl: std::fs::File,
    pub(crate) progress: Progress,
    pub(crate) results: Vec<CellResult>,
}

impl Recorder {
    pub(crate) fn new(jsonl: std::fs::File, progress: Progress) -> Self {
        Recorder {
            jsonl,
            progress,
            results: Vec::new(),
        }
    }

    pub(crate) fn record(&mut self, r: CellResult) -> Result<()> {
        let line = serde_json::to_string(&r).expect("results serialise");
        // One line per cell, flushed at once: a crash loses nothing already measured.
        writeln!(self.jsonl, "{line}")
            .and_then(|_| self.jsonl.flush())
            .context("failed to append to results.jsonl")?;
        self.progress.cell(&r);
        self.results.push(r);
        Ok(())
    }
}
