//! A Codex version the npm registry has no linux-x64 build of stops everything before a cell
//! runs: exit 2 with `file:line:col` and the nearest releases that exist. Needs the binary and
//! the npm registry (its version list).

mod common;

use common::*;

#[test]
fn an_unknown_codex_version_exits_2_naming_its_neighbours() {
    let t = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(repo().join("matrix.toml"))
        .unwrap()
        .replace(
            "dir = \"scenarios\"",
            &format!("dir = \"{}\"", repo().join("scenarios").display()),
        );
    // 0.119.0 was never published (0.118.0 and 0.120.0 were).
    let edited = original.replacen(
        "version = [\"0.114.0\", ",
        "version = [\"0.114.0\", \"0.119.0\", ",
        1,
    );
    assert_ne!(edited, original, "the edit changed nothing");
    let p = t.path().join("matrix.toml");
    std::fs::write(&p, &edited).unwrap();
    let line = edited
        .lines()
        .position(|l| l.contains("\"0.119.0\""))
        .unwrap()
        + 1;
    let o = nsmatrix(&["list", "--matrix", p.to_str().unwrap()]);
    let out = text(&o);
    if out.contains("codex-version-unchecked") {
        require(false, &format!("the npm registry's version list: {out}"));
        return;
    }
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains(&format!("matrix.toml:{line}:")) && out.contains("unknown-codex-version"),
        "{out}"
    );
    assert!(
        out.contains("nearest releases that exist: 0.118.0, 0.120.0"),
        "{out}"
    );
}
