//! Bad rules in matrix.toml stop everything before a cell runs: a `when` value that is not a
//! value of its axis (with a near-miss hint), a rule that matches no cell, a signature that
//! cannot be expected. Exit 2 with `file:line:col`. Needs only the binary.

mod common;

use common::*;

/// The default matrix with `edit` applied, written where its scenarios still resolve.
fn matrix_with(dir: &std::path::Path, edit: &dyn Fn(String) -> String) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join("matrix.toml")).unwrap();
    let text = text.replace(
        "dir = \"scenarios\"",
        &format!("dir = \"{}\"", repo().join("scenarios").display()),
    );
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit changed nothing");
    let p = dir.join("matrix.toml");
    std::fs::write(&p, edited).unwrap();
    p
}

#[test]
fn a_when_typo_exits_2_with_file_line_col_and_a_hint() {
    let t = tempfile::tempdir().unwrap();
    let p = matrix_with(t.path(), &|s| {
        s.replacen(
            r#"profile = "holyclaude" }"#,
            r#"profile = "holyclaud" }"#,
            1,
        )
    });
    let text = std::fs::read_to_string(&p).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains(r#""holyclaud""#))
        .unwrap()
        + 1;
    let col = text
        .lines()
        .nth(line - 1)
        .unwrap()
        .find(r#""holyclaud""#)
        .unwrap()
        + 1;
    for cmd in ["list", "run"] {
        let o = nsmatrix(&[cmd, "--matrix", p.to_str().unwrap()]);
        let out = text_of(&o);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {out}");
        assert!(
            out.contains(&format!(
                "{}:{line}:{col}: error[unknown-axis-value]",
                p.display()
            )),
            "{cmd}: {out}"
        );
        assert!(out.contains("did you mean `holyclaude`?"), "{cmd}: {out}");
    }
}

#[test]
fn an_unused_rule_exits_2_unless_allowed() {
    let t = tempfile::tempdir().unwrap();
    let p = matrix_with(t.path(), &|s| {
        s + "\n[[expect]]\nwhen = { backend = \"qemu\", image = \"trixie\" }\nfail = \"userns-denied\"\n"
    });
    let o = nsmatrix(&["list", "--matrix", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text_of(&o));
    assert!(
        text_of(&o).contains("error[unused-rule]"),
        "{}",
        text_of(&o)
    );
    let o = nsmatrix(&[
        "list",
        "--allow-unused-rules",
        "--matrix",
        p.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text_of(&o));
    assert!(
        text_of(&o).contains("warning[unused-rule]"),
        "{}",
        text_of(&o)
    );
}

#[test]
fn unknown_and_tree_mismatch_are_not_expectations() {
    for sig in ["unknown", "tree-mismatch"] {
        let t = tempfile::tempdir().unwrap();
        let p = matrix_with(t.path(), &|s| {
            s + &format!(
                "\n[[expect]]\nwhen = {{ backend = \"host\", profile = \"none\" }}\nfail = \"{sig}\"\n"
            )
        });
        let o = nsmatrix(&["list", "--matrix", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{}", text_of(&o));
        assert!(
            text_of(&o).contains("error[unexpectable-signature]"),
            "{}",
            text_of(&o)
        );
    }
}

fn text_of(o: &std::process::Output) -> String {
    text(o)
}

/// An AppArmor policy set that `vm-images/apparmor/` does not have, and the axis on a backend
/// that has none: exit 2 at the value's line and column.
#[test]
fn an_unknown_apparmor_set_exits_2_at_its_line() {
    let t = tempfile::tempdir().unwrap();
    let p = matrix_with(t.path(), &|s| {
        s.replacen(
            r#""ubuntu-like+bwrap-userns-restrict", "confined-no-userns"]"#,
            r#""ubuntu-like+bwrap-userns-restrct", "confined-no-userns"]"#,
            1,
        )
    });
    let text = std::fs::read_to_string(&p).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("bwrap-userns-restrct"))
        .unwrap()
        + 1;
    // The axis's value (a list: its opening bracket).
    let col = text.lines().nth(line - 1).unwrap().find('[').unwrap() + 1;
    let o = nsmatrix(&["list", "--matrix", p.to_str().unwrap()]);
    let out = text_of(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "{}:{line}:{col}: error[bad-axis-value]",
            p.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("no AppArmor policy set named `bwrap-userns-restrct`"),
        "{out}"
    );
    assert!(
        out.contains("confined-no-userns"),
        "the help names the sets: {out}"
    );

    let p = matrix_with(t.path(), &|s| {
        s.replacen(
            "name = \"host\"\nbackend = \"host\"\n",
            "name = \"host\"\nbackend = \"host\"\napparmor = \"ubuntu-like\"\n",
            1,
        )
    });
    let o = nsmatrix(&["list", "--matrix", p.to_str().unwrap()]);
    let out = text_of(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(out.contains("error[unknown-axis]"), "{out}");
    assert!(out.contains("has no axis `apparmor`"), "{out}");
}
