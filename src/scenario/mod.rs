//! Scenarios: a directory with `input/` (optional), `patch.txt`, `expected/` and an optional
//! `scenario.toml`. Load them, lay one out in a workspace, compare a tree with `expected/`.
//!
//! A scenario without `expected/` expects the tree after the run to equal `input/` (nothing
//! changed): the usual case for a patch that must fail. Empty directories are not compared
//! (Codex never creates an empty one, and git cannot hold one); symlinks are compared as
//! symlinks (their targets), never followed. See scenarios/README.md for the format.

use std::fs;
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
    /// apply_patch's stdout inside a sandbox that blocks the write, recorded from Codex
    /// 0.171.0 in its own sandbox; `<WS>` stands for the workspace, `<CELL>` for its parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxed_stdout: Option<TextExpect>,
    /// Likewise for stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxed_stderr: Option<TextExpect>,
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

/// Load one scenario directory: `patch.txt` must exist; `scenario.toml` is optional (unknown
/// keys are rejected). Codex's own fixtures (`input/`, `patch.txt`, `expected/`) load as is.
pub fn load(dir: &Path) -> Result<Scenario, ScenarioError> {
    let patch = dir.join("patch.txt");
    if !patch.is_file() {
        return Err(ScenarioError::Invalid {
            path: dir.to_path_buf(),
            message: "not a scenario: no patch.txt".into(),
        });
    }
    let toml_path = dir.join("scenario.toml");
    let meta = match fs::read_to_string(&toml_path) {
        Ok(text) => toml::from_str(&text).map_err(|e| ScenarioError::Invalid {
            path: toml_path.clone(),
            message: e.to_string().trim_end().to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ScenarioMeta::default(),
        Err(source) => {
            return Err(ScenarioError::Io {
                path: toml_path,
                source,
            });
        }
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    Ok(Scenario {
        name,
        dir: dir.to_path_buf(),
        meta,
    })
}

/// Load every scenario under `dir` (each subdirectory holding a `patch.txt`), sorted by name.
/// A `dir` that is itself a scenario loads as a set of one.
pub fn load_set(dir: &Path) -> Result<Vec<Scenario>, ScenarioError> {
    if dir.join("patch.txt").is_file() {
        return Ok(vec![load(dir)?]);
    }
    let entries = fs::read_dir(dir).map_err(|source| ScenarioError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ScenarioError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = entry.path();
        if p.is_dir() && p.join("patch.txt").is_file() {
            out.push(load(&p)?);
        }
    }
    if out.is_empty() {
        return Err(ScenarioError::Invalid {
            path: dir.to_path_buf(),
            message: "no scenarios (no subdirectory holds a patch.txt)".into(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

impl Scenario {
    pub fn patch_path(&self) -> PathBuf {
        self.dir.join("patch.txt")
    }

    /// The patch text (read as bytes, so a non-UTF-8 patch is still passed on verbatim).
    pub fn patch_bytes(&self) -> std::io::Result<Vec<u8>> {
        fs::read(self.patch_path())
    }

    /// `input/`, if the scenario has one.
    pub fn input_dir(&self) -> Option<PathBuf> {
        Some(self.dir.join("input")).filter(|p| p.is_dir())
    }

    /// The tree expected after the run: `expected/`, else `input/` (unchanged), else none
    /// (an empty tree).
    pub fn expected_dir(&self) -> Option<PathBuf> {
        Some(self.dir.join("expected"))
            .filter(|p| p.is_dir())
            .or_else(|| self.input_dir())
    }

    /// Copy `input/` into the (existing, empty) workspace `ws`, symlinks kept as symlinks.
    pub fn materialise(&self, ws: &Path) -> std::io::Result<()> {
        match self.input_dir() {
            Some(input) => copy_tree(&input, ws),
            None => Ok(()),
        }
    }

    /// Compare the workspace after a run with [`Scenario::expected_dir`].
    pub fn check_tree(&self, ws: &Path) -> Result<(), TreeDiff> {
        match self.expected_dir() {
            Some(exp) => compare_tree(&exp, ws),
            None => compare_entries(&[], &list_tree(ws)),
        }
    }
}

impl TextExpect {
    /// Whether `actual` (already normalised) meets this expectation.
    pub fn matches(&self, actual: &str) -> bool {
        self.exact.as_ref().is_none_or(|e| e == actual)
            && self.contains.iter().all(|c| actual.contains(c.as_str()))
    }
}

/// Replace the workspace path in a tool's output with `<WS>`, so expectations are portable.
pub fn normalise_output(text: &str, ws: &Path) -> String {
    text.replace(&*ws.to_string_lossy(), "<WS>")
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else if ft.is_dir() {
            fs::create_dir_all(&dst)?;
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// The first difference between two trees, with a short diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDiff {
    pub path: String,
    pub summary: String,
}

impl std::fmt::Display for TreeDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.summary)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    File(Vec<u8>),
    Link(PathBuf),
    Unreadable(String),
}

/// Files and symlinks under `root`, by relative path, sorted; directories only as parents.
fn list_tree(root: &Path) -> Vec<(String, Entry)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Entry)>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for entry in rd.flatten() {
            let p = entry.path();
            let rel = p
                .strip_prefix(root)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            match entry.file_type() {
                Ok(ft) if ft.is_symlink() => {
                    let t = fs::read_link(&p).unwrap_or_default();
                    out.push((rel, Entry::Link(t)));
                }
                Ok(ft) if ft.is_dir() => walk(root, &p, out),
                _ => match fs::read(&p) {
                    Ok(b) => out.push((rel, Entry::File(b))),
                    Err(e) => out.push((rel, Entry::Unreadable(e.to_string()))),
                },
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Compare `actual` with `expected`: the set of files (and symlinks), content bytes.
pub fn compare_tree(expected: &Path, actual: &Path) -> Result<(), TreeDiff> {
    compare_entries(&list_tree(expected), &list_tree(actual))
}

fn compare_entries(exp: &[(String, Entry)], act: &[(String, Entry)]) -> Result<(), TreeDiff> {
    let (mut i, mut j) = (0, 0);
    loop {
        match (exp.get(i), act.get(j)) {
            (None, None) => return Ok(()),
            (Some((p, _)), None) => return Err(missing(p)),
            (None, Some((p, _))) => return Err(unexpected(p)),
            (Some((pe, e)), Some((pa, a))) => {
                if pe < pa {
                    return Err(missing(pe));
                }
                if pa < pe {
                    return Err(unexpected(pa));
                }
                if e != a {
                    return Err(TreeDiff {
                        path: pe.clone(),
                        summary: describe(e, a),
                    });
                }
                i += 1;
                j += 1;
            }
        }
    }
}

fn missing(p: &str) -> TreeDiff {
    TreeDiff {
        path: p.to_string(),
        summary: "expected but missing".into(),
    }
}

fn unexpected(p: &str) -> TreeDiff {
    TreeDiff {
        path: p.to_string(),
        summary: "present but not expected".into(),
    }
}

fn describe(e: &Entry, a: &Entry) -> String {
    match (e, a) {
        (Entry::File(x), Entry::File(y)) => first_line_diff(x, y),
        (Entry::Link(x), Entry::Link(y)) => {
            format!(
                "symlink to {} expected, found symlink to {}",
                x.display(),
                y.display()
            )
        }
        (Entry::Link(x), _) => format!("symlink to {} expected, found a file", x.display()),
        (_, Entry::Link(y)) => format!("a file expected, found symlink to {}", y.display()),
        (_, Entry::Unreadable(m)) | (Entry::Unreadable(m), _) => format!("unreadable: {m}"),
    }
}

/// A short diff: the first differing line (1-based), expected vs actual, escaped.
fn first_line_diff(x: &[u8], y: &[u8]) -> String {
    let xs: Vec<&[u8]> = x.split_inclusive(|b| *b == b'\n').collect();
    let ys: Vec<&[u8]> = y.split_inclusive(|b| *b == b'\n').collect();
    let n = xs.iter().zip(&ys).take_while(|(a, b)| a == b).count();
    let show = |l: Option<&&[u8]>| match l {
        Some(l) => format!("{:?}", String::from_utf8_lossy(l)),
        None => "<end of file>".to_string(),
    };
    format!(
        "content differs ({} vs {} bytes) at line {}:\n-{}\n+{}",
        x.len(),
        y.len(),
        n + 1,
        show(xs.get(n)),
        show(ys.get(n))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_first_difference() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        fs::create_dir_all(a.path().join("d")).unwrap();
        fs::create_dir_all(b.path().join("d")).unwrap();
        fs::write(a.path().join("d/f"), "x\ny\n").unwrap();
        fs::write(b.path().join("d/f"), "x\nz\n").unwrap();
        let d = compare_tree(a.path(), b.path()).unwrap_err();
        assert_eq!(d.path, "d/f");
        assert!(d.summary.contains("line 2"), "{}", d.summary);
        fs::write(b.path().join("d/f"), "x\ny\n").unwrap();
        assert_eq!(compare_tree(a.path(), b.path()), Ok(()));
        // Empty directories do not count.
        fs::create_dir(b.path().join("empty")).unwrap();
        assert_eq!(compare_tree(a.path(), b.path()), Ok(()));
        std::os::unix::fs::symlink("../x", b.path().join("l")).unwrap();
        assert_eq!(compare_tree(a.path(), b.path()).unwrap_err().path, "l");
        std::os::unix::fs::symlink("../y", a.path().join("l")).unwrap();
        let d = compare_tree(a.path(), b.path()).unwrap_err();
        assert!(d.summary.contains("symlink"), "{}", d.summary);
    }
}
