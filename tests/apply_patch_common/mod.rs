//! Shared by the apply_patch integration tests: run an `apply_patch` binary on a scenario in
//! a fresh cell and capture everything that can differ.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nsmatrix::scenario::{Scenario, normalise_output};

/// A directory with a symlink named `apply_patch` to `target`: the argv[0] dispatch Codex
/// and nsmatrix both use.
pub struct Engine {
    pub name: &'static str,
    pub bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Engine {
    pub fn new(name: &'static str, target: &Path) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("apply_patch");
        std::os::unix::fs::symlink(target, &bin).unwrap();
        Engine {
            name,
            bin,
            _dir: dir,
        }
    }

    pub fn ours() -> Engine {
        Engine::new("nsmatrix", Path::new(env!("CARGO_BIN_EXE_nsmatrix")))
    }
}

/// What one run produced, with the workspace path normalised to `<WS>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Every file and symlink of the cell (ws/ and outside/), with content or target.
    pub tree: Vec<(String, String)>,
    /// Files the patch wrote at absolute /tmp/nsmatrix-escape-* paths (then removed).
    pub escaped: Vec<(String, String)>,
}

/// A cell as the sandbox runner lays it out: `<cell>/ws` and `<cell>/outside/sentinel.txt`.
pub struct Cell {
    pub dir: tempfile::TempDir,
}

impl Default for Cell {
    fn default() -> Cell {
        Cell::new()
    }
}

impl Cell {
    pub fn new() -> Cell {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("ws")).unwrap();
        fs::create_dir(dir.path().join("outside")).unwrap();
        fs::write(dir.path().join("outside/sentinel.txt"), "sentinel\n").unwrap();
        Cell { dir }
    }
    pub fn ws(&self) -> PathBuf {
        self.dir.path().join("ws")
    }
}

pub fn run_patch(engine: &Engine, cell: &Cell, patch: &[u8], escapes: &[String]) -> Outcome {
    for e in escapes {
        fs::remove_file(e).ok();
    }
    let ws = cell.ws();
    let out = Command::new(&engine.bin)
        .arg(OsString::from_vec(patch.to_vec()))
        .current_dir(&ws)
        .output()
        .unwrap();
    let escaped = escapes
        .iter()
        .filter_map(|e| {
            let c = fs::read(e).ok()?;
            fs::remove_file(e).ok();
            Some((e.clone(), String::from_utf8_lossy(&c).into_owned()))
        })
        .collect();
    Outcome {
        exit: out.status.code(),
        stdout: normalise_output(&String::from_utf8_lossy(&out.stdout), &ws),
        stderr: normalise_output(&String::from_utf8_lossy(&out.stderr), &ws),
        tree: snapshot(cell.dir.path()),
        escaped,
    }
}

pub fn run_scenario(engine: &Engine, s: &Scenario) -> Outcome {
    let cell = Cell::new();
    s.materialise(&cell.ws()).unwrap();
    let escapes: Vec<String> = s
        .meta
        .confinement
        .iter()
        .flat_map(|c| c.outside.iter().filter(|p| p.starts_with('/')).cloned())
        .collect();
    let out = run_patch(engine, &cell, &s.patch_bytes().unwrap(), &escapes);
    if let Err(d) = s.check_tree(&cell.ws()) {
        panic!(
            "{}: {}: workspace differs from expected: {d}",
            engine.name, s.name
        );
    }
    out
}

/// Every file and symlink under `root`, sorted, with lossy content (so a diff is readable).
pub fn snapshot(root: &Path) -> Vec<(String, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                out.push((rel, format!("-> {}", fs::read_link(&p).unwrap().display())));
            } else if ft.is_dir() {
                out.push((format!("{rel}/"), String::new()));
                walk(root, &p, out);
            } else {
                let b = fs::read(&p).unwrap();
                out.push((rel, format!("{:?}", String::from_utf8_lossy(&b))));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// The pinned reference: Codex CLI from npm. `None` (with the reason printed) when it cannot
/// be fetched outside CI; in CI (`CI` set, not false/0) that is a test failure instead.
pub fn codex_engine() -> Option<Engine> {
    match nsmatrix::artifacts::npm::codex_package(CODEX_VERSION) {
        Ok(pkg) => Some(Engine::new("codex", &pkg.codex)),
        Err(e) => {
            let msg = format!("cannot fetch @openai/codex@{CODEX_VERSION}-linux-x64: {e:#}");
            // The same gate as tests/common's `in_ci`: CI set and not empty, false or 0.
            if std::env::var("CI").is_ok_and(|v| {
                let v = v.trim();
                !v.is_empty() && !v.eq_ignore_ascii_case("false") && v != "0"
            }) {
                panic!("{msg}");
            }
            eprintln!("SKIPPING the differential test: {msg}");
            None
        }
    }
}

/// The Codex release the engine and the corpus were checked against.
pub const CODEX_VERSION: &str = "0.171.0";
