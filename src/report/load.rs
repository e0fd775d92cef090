//! Reading a run back: [`load`] takes a run directory or a `results.json` and returns its
//! [`RunResults`], with a typed [`LoadError`] that names the file and what to do.

use std::path::{Path, PathBuf};

use super::model::{OLDEST_READABLE_SCHEMA, RunResults, SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to read {path}: give a run directory (reports/<run>/) or its results.json")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {path} as nsmatrix results (was it written by `nsmatrix run`?)")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} has results schema version {found}; this nsmatrix reads versions {OLDEST_READABLE_SCHEMA} to {SCHEMA_VERSION}: use the nsmatrix that wrote it, or rerun"
    )]
    Version { path: PathBuf, found: u32 },
}

/// The `results.json` a path names: the file itself, or the one inside a run directory.
pub fn results_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("results.json")
    } else {
        path.to_path_buf()
    }
}

/// Load a run from its directory or its `results.json`.
pub fn load(path: &Path) -> Result<RunResults, LoadError> {
    let path = results_path(path);
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
        path: path.clone(),
        source,
    })?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Head {
        schema_version: u32,
    }
    let head: Head = serde_json::from_str(&text).map_err(|source| LoadError::Parse {
        path: path.clone(),
        source,
    })?;
    if !(OLDEST_READABLE_SCHEMA..=SCHEMA_VERSION).contains(&head.schema_version) {
        return Err(LoadError::Version {
            path,
            found: head.schema_version,
        });
    }
    serde_json::from_str(&text).map_err(|source| LoadError::Parse { path, source })
}
