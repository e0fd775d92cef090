//! `nsmatrix merge`: [`merge`] combines the [`RunResults`] of shards (`run --shard K/N`) into
//! one run whose cells, statuses and counts equal an unsharded run's, in the same order
//! (the matrix's, by each cell's ordinal).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::model::{RunResults, SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("nothing to merge: name the shards' run directories")]
    NoInputs,
    #[error(
        "{path} is shard {index}/{count} but {other} is a shard of {other_count}: merge the shards of one sharded run"
    )]
    ShardCount {
        path: PathBuf,
        index: u32,
        count: u32,
        other: PathBuf,
        other_count: u32,
    },
    #[error(
        "{path} is not a shard (no `shard` in its results.json) but {other} is: merge shards only"
    )]
    Mixed { path: PathBuf, other: PathBuf },
    #[error("{a} and {b} are both shard {index}/{count}")]
    DuplicateShard {
        a: PathBuf,
        b: PathBuf,
        index: u32,
        count: u32,
    },
    #[error(
        "shard(s) {missing} of {count} missing: run `nsmatrix run --shard K/{count}` for them and merge all {count}"
    )]
    MissingShards { missing: String, count: u32 },
    #[error(
        "cell `{id}` is in both {a} and {b}: the inputs overlap (same shard twice, or the same run?)"
    )]
    DuplicateCell { id: String, a: PathBuf, b: PathBuf },
    #[error(
        "the shards hold {got} cells but say the sharded run has {want}: were they run with the same matrix and filters?"
    )]
    CellCount { got: usize, want: usize },
    #[error(
        "{a} ran every cell {ra} times and {b} {rb} times: merge runs made with the same --repeat"
    )]
    Repeat {
        a: PathBuf,
        ra: u32,
        b: PathBuf,
        rb: u32,
    },
}

/// Merge runs (each with the path it was read from, for messages).
pub fn merge(
    inputs: Vec<(PathBuf, RunResults)>,
    run_name: Option<String>,
) -> Result<RunResults, MergeError> {
    let Some((first_path, first)) = inputs.first().cloned() else {
        return Err(MergeError::NoInputs);
    };
    // Shard bookkeeping: all or none are shards, of one count, each index once, none missing.
    let mut seen: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let mut want_cells = None;
    for (path, run) in &inputs {
        if run.repeat != first.repeat {
            return Err(MergeError::Repeat {
                a: first_path.clone(),
                ra: first.repeat,
                b: path.clone(),
                rb: run.repeat,
            });
        }
        match (&first.shard, &run.shard) {
            (Some(f), Some(s)) => {
                if s.count != f.count {
                    return Err(MergeError::ShardCount {
                        path: path.clone(),
                        index: s.index,
                        count: s.count,
                        other: first_path.clone(),
                        other_count: f.count,
                    });
                }
                if let Some(a) = seen.insert(s.index, path.clone()) {
                    return Err(MergeError::DuplicateShard {
                        a,
                        b: path.clone(),
                        index: s.index,
                        count: s.count,
                    });
                }
                want_cells = Some(s.total_cells);
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(MergeError::Mixed {
                    path: path.clone(),
                    other: first_path.clone(),
                });
            }
            (None, Some(_)) => {
                return Err(MergeError::Mixed {
                    path: first_path.clone(),
                    other: path.clone(),
                });
            }
        }
    }
    if let Some(f) = &first.shard {
        let missing: Vec<String> = (1..=f.count)
            .filter(|i| !seen.contains_key(i))
            .map(|i| i.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(MergeError::MissingShards {
                missing: missing.join(", "),
                count: f.count,
            });
        }
    }
    let mut owner: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut cells = Vec::new();
    let mut batches = Vec::new();
    let mut interrupted: Vec<String> = Vec::new();
    let mut started = first.started.clone();
    let mut duration_ms = 0;
    for (path, run) in inputs {
        for c in &run.cells {
            if let Some(a) = owner.insert(c.id.clone(), path.clone()) {
                return Err(MergeError::DuplicateCell {
                    id: c.id.clone(),
                    a,
                    b: path,
                });
            }
        }
        cells.extend(run.cells);
        batches.extend(run.batches);
        if let Some(i) = run.interrupted {
            interrupted.push(i);
        }
        if run.started < started {
            started = run.started;
        }
        // Shards run side by side: the merged run took as long as the slowest.
        duration_ms = duration_ms.max(run.duration_ms);
    }
    if let Some(want) = want_cells
        && cells.len() != want
    {
        return Err(MergeError::CellCount {
            got: cells.len(),
            want,
        });
    }
    cells.sort_by(|a, b| a.ordinal.cmp(&b.ordinal).then_with(|| a.id.cmp(&b.id)));
    batches.sort_by(|a, b| a.environment.cmp(&b.environment));
    interrupted.dedup();
    Ok(RunResults {
        schema_version: SCHEMA_VERSION,
        run_name: run_name.unwrap_or(first.run_name),
        matrix: first.matrix,
        started,
        duration_ms,
        interrupted: (!interrupted.is_empty()).then(|| interrupted.join("; ")),
        host: first.host,
        batches,
        cells,
        shard: None,
        repeat: first.repeat,
        require: first.require,
        timeline: None,
    })
}
