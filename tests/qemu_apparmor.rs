//! AppArmor policy sets in real guests (TCG): the real binary runs a small matrix on Debian's
//! 6.12 under `none`, `ubuntu-like` and `confined-no-userns`, and on 6.1 (whose AppArmor does
//! not mediate user namespaces) under `confined-no-userns`. Each AppArmor-caused failure must
//! carry its audit line from the guest's kernel log.
//! Without qemu this fails when `CI` is set (see tests/common) and is skipped loudly otherwise.

mod common;

use std::process::Command;

use common::*;

const MATRIX: &str = r#"
[settings]
cell-timeout = "60s"
batch-timeout = "10m"

[[environment]]
name = "aa"
backend = "qemu"
kernel = "debian-6.12"
apparmor = ["none", "ubuntu-like", "confined-no-userns"]

[[environment]]
name = "aa61"
backend = "qemu"
kernel = "debian-6.1"
apparmor = "confined-no-userns"

[[subject]]
name = "bwrap"
kind = "bwrap"
setuid = false

[[scenarios]]
name = "smoke"
dir = "SCENARIOS"
only = ["add_file"]

[[expect]]
when = { environment = "aa", apparmor = "ubuntu-like" }
fail = "userns-denied-apparmor"

[[expect]]
when = { environment = "aa", apparmor = "confined-no-userns" }
fail = "userns-lsm-denied"
"#;

#[test]
fn apparmor_sets_give_their_signatures_with_the_audit_line() {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(qemu, "qemu-system-x86_64") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let matrix = dir.path().join("matrix.toml");
    let scenarios = repo().join("scenarios");
    std::fs::write(
        &matrix,
        MATRIX.replace("SCENARIOS", scenarios.to_str().unwrap()),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = nsmatrix(&[
        "run",
        "--quiet",
        "--jobs",
        "2",
        "--require",
        "none",
        "--matrix",
        matrix.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let results = read_json(&out.join("results.json"));
    let cells = results["cells"].as_array().expect("cells");
    let cell = |id: &str| {
        cells
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no cell {id}: {}", text(&o)))
    };
    let log = |c: &serde_json::Value| {
        c["details"]["kernel.log"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };

    let none = cell("aa-aa-none/bwrap-system+codex/smoke/add_file");
    assert_eq!(none["status"], "PASS", "{none}");
    assert!(!log(none).contains("apparmor=\"DENIED\""), "{none}");

    // A profile confining bwrap without `userns,`: EACCES at clone, the kernel's own line.
    let confined = cell("aa-aa-confined-no-userns/bwrap-system+codex/smoke/add_file");
    assert_eq!(confined["status"], "XFAIL", "{confined}");
    assert_eq!(confined["signature"], "userns-lsm-denied", "{confined}");
    assert!(
        confined["message"]
            .as_str()
            .unwrap()
            .contains("Creating new namespace failed: Permission denied"),
        "{confined}"
    );
    let l = log(confined);
    assert!(
        l.contains("apparmor=\"DENIED\"") && l.contains("operation=\"userns_create\""),
        "{confined}"
    );
    assert!(
        confined["details"]["apparmor.policy"]
            .as_str()
            .unwrap()
            .contains("nsmatrix-bwrap-no-userns (enforce)"),
        "{confined}"
    );

    // Capabilities denied in the new user namespace: named AppArmor only from its audit line.
    let ubuntu = cell("aa-aa-ubuntu-like/bwrap-system+codex/smoke/add_file");
    assert_eq!(ubuntu["status"], "XFAIL", "{ubuntu}");
    assert_eq!(ubuntu["signature"], "userns-denied-apparmor", "{ubuntu}");
    let l = log(ubuntu);
    assert!(
        l.contains("apparmor=\"DENIED\"")
            && l.contains("operation=\"capable\"")
            && l.contains("capname=\"sys_admin\""),
        "{ubuntu}"
    );

    // Debian's 6.1 has no user namespace mediation: the set cannot apply, so SKIP, never PASS.
    let old = cell("aa61/bwrap-system+codex/smoke/add_file");
    assert_eq!(old["status"], "SKIP", "{old}");
    assert!(
        old["message"]
            .as_str()
            .unwrap()
            .contains("does not mediate user namespace creation"),
        "{old}"
    );
    // The SKIP is the only thing not met.
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
