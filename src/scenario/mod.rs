//! Scenarios: a directory with `input/` (optional), `patch.txt`, `expected/` and an optional
//! `scenario.toml`. Load them, lay one out in a workspace, compare a tree with `expected/`.
//!
//! (Interface agreed with the agent; the implementation is being written.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One loaded scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub dir: PathBuf,
    pub meta: ScenarioMeta,
}

/// `scenario.toml`; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScenarioMeta {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Expected exit code of apply_patch (default 0).
    #[serde(default)]
    pub exit_code: i32,
    pub stdout: Option<TextExpect>,
    pub stderr: Option<TextExpect>,
    /// Set for confinement cases: the patch tries to write outside the workspace.
    pub confinement: Option<Confinement>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TextExpect {
    /// The whole text, exactly (after normalising the workspace path to `<WS>`).
    pub exact: Option<String>,
    /// Substrings that must all appear.
    #[serde(default)]
    pub contains: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Confinement {
    /// Paths the patch tries to write, relative to the workspace (`../x`) or absolute.
    pub outside: Vec<String>,
    /// apply_patch's exit code inside a sandbox that blocks the write (default 1).
    #[serde(default = "one")]
    pub sandboxed_exit_code: i32,
    /// Why Codex's apply_patch does (or does not) write there unsandboxed.
    #[serde(default)]
    pub note: String,
}

fn one() -> i32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("failed to read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Load one scenario directory.
pub fn load(_dir: &Path) -> Result<Scenario, ScenarioError> {
    unimplemented!("scenario::load")
}

/// Load every scenario under `dir` (each subdirectory holding a `patch.txt`), sorted by name.
/// A `dir` that is itself a scenario loads as a set of one.
pub fn load_set(_dir: &Path) -> Result<Vec<Scenario>, ScenarioError> {
    unimplemented!("scenario::load_set")
}

impl Scenario {
    pub fn patch_path(&self) -> PathBuf {
        self.dir.join("patch.txt")
    }

    /// Copy `input/` into the (existing, empty) workspace `ws`, symlinks kept as symlinks.
    pub fn materialise(&self, _ws: &Path) -> std::io::Result<()> {
        unimplemented!("Scenario::materialise")
    }
}

/// The first difference between two trees, with a short diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDiff {
    pub path: String,
    pub summary: String,
}

/// Compare `actual` with `expected`: the set of files (and symlinks), content bytes.
pub fn compare_tree(_expected: &Path, _actual: &Path) -> Result<(), TreeDiff> {
    unimplemented!("scenario::compare_tree")
}
