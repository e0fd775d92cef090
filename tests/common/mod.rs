//! Helpers shared by the integration tests: the real binary, and the rule that a missing
//! requirement fails under CI (which installs everything) and skips loudly elsewhere.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nsmatrix"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// CI is on when `CI` is set to anything but empty, `false` or `0` (`CI=1`, `CI=true`,
/// `CI=yes`): the one gate every test that needs a real backend goes through.
pub fn in_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

/// [`in_ci`] for a given value of `CI` (unset = `None`).
pub fn ci_value(v: Option<&str>) -> bool {
    v.map(str::trim)
        .is_some_and(|v| !v.is_empty() && !v.eq_ignore_ascii_case("false") && v != "0")
}

/// Whether a Docker engine answers `docker info`.
pub fn docker_answers() -> bool {
    Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `true` when the requirement holds; otherwise panics under CI and returns `false` (the test
/// then returns early) elsewhere, saying so on stderr.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("requirement missing in CI: {what}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of a passing test, and a
    // skip must be seen (`cargo test` shows this line whatever the test's outcome).
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED (not in CI): {}: {what}",
        std::thread::current().name().unwrap_or("a test")
    );
    false
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

pub fn nsmatrix(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("nsmatrix runs")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("file exists")).expect("valid JSON")
}
