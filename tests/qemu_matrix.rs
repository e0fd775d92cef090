//! The acceptance table, measured in real guests: kernels × sysctl sets × bwrap setuid
//! or not × Codex's current and legacy argv, one boot per (kernel, sysctl set).
//! Without qemu these tests fail when `CI` is set (see tests/common) and are skipped loudly otherwise.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nsmatrix::backend::qemu::QemuBackend;
use nsmatrix::backend::{BackendEvent, BatchCtx};
use nsmatrix::matrix::model::{EnvKind, Environment, QemuEnv};
use nsmatrix::protocol::*;
use tokio_util::sync::CancellationToken;

const CELLS: [(SetuidMode, ArgvProfile); 4] = [
    (SetuidMode::Never, ArgvProfile::Codex),
    (SetuidMode::Force, ArgvProfile::Codex),
    (SetuidMode::Never, ArgvProfile::CodexLegacy),
    (SetuidMode::Force, ArgvProfile::CodexLegacy),
];

fn sysctl_set(name: &str) -> BTreeMap<String, String> {
    let kv: &[(&str, &str)] = match name {
        "max-userns-0" => &[("user.max_user_namespaces", "0")],
        "unpriv-clone-0" => &[("kernel.unprivileged_userns_clone", "0")],
        _ => &[],
    };
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One guest of `kernel` with the sysctl set `set` running `subjects` on `scenario` (uid
/// 1000): the records in the order of `subjects`.
async fn run_cells(
    kernel: &str,
    set: &str,
    image: Option<&str>,
    subjects: &[SubjectSpec],
    scenario: &str,
) -> Option<Vec<CellRecord>> {
    let b = match QemuBackend::probe().await {
        Ok(b) => b,
        Err(u) => {
            common::require(false, &format!("the qemu backend: {u}"));
            return None;
        }
    };
    let sysctls = sysctl_set(set);
    let env = Environment {
        id: format!("qemu-{kernel}-{set}"),
        name: "qemu".into(),
        axes: BTreeMap::new(),
        uid: 1000,
        kind: EnvKind::Qemu(QemuEnv {
            kernel: kernel.into(),
            image: image.map(String::from),
            sysctls: sysctls.clone(),
            profile: None,
            apparmor: "none".into(),
            vcpus: 1,
        }),
    };
    let batch = format!("matrix-{kernel}-{set}-{}", subjects.len());
    let spec = BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: batch.clone(),
        work_dir: "/unused-on-host".into(),
        uid: 1000,
        gid: 1000,
        restrictions: Default::default(),
        sysctls: sysctls.clone(),
        agent_bin: PathBuf::from(env!("CARGO_BIN_EXE_nsmatrix")),
        kernel_log: None,
        cells: subjects
            .iter()
            .enumerate()
            .map(|(i, subject)| CellSpec {
                id: format!("{i}"),
                subject: subject.clone(),
                scenario_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("scenarios")
                    .join(scenario),
                timeout_ms: 60_000,
                needs_sysctls: sysctls.keys().cloned().collect(),
            })
            .collect(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = BatchCtx {
        run_id: "test".into(),
        batch_id: batch.clone(),
        log_dir: std::env::temp_dir().join(format!("nsmatrix-qemu-test-logs/{batch}")),
        timeout: Duration::from_secs(300),
        cancel: CancellationToken::new(),
        events: tx,
    };
    let timed = b.run_batch_timed(&env, spec, &ctx).await;
    drop(ctx);
    let timings = timed.unwrap_or_else(|e| panic!("{kernel} {set}: {e}"));
    let mut out: Vec<Option<CellRecord>> = vec![None; subjects.len()];
    while let Some(ev) = rx.recv().await {
        if let BackendEvent::Agent {
            event: AgentEvent::CellFinished(c),
            ..
        } = ev
        {
            let i: usize = c.id.parse().unwrap();
            out[i] = Some(c);
        }
    }
    eprintln!("{kernel} {set}: {timings:?}");
    let out: Vec<CellRecord> = out.into_iter().flatten().collect();
    assert_eq!(out.len(), subjects.len(), "{kernel} {set}: {out:?}");
    Some(out)
}

/// "pass" | signature | "skip (why)" | "error (why)".
fn verdict(c: &CellRecord) -> String {
    match &c.outcome {
        Outcome::Passed => "pass".to_string(),
        Outcome::Failed { signature, .. } => signature.clone(),
        Outcome::Skipped { reason } => format!("skip ({reason})"),
        Outcome::Error { message, .. } => format!("error ({message})"),
    }
}

/// (setuid, argv) → "pass" | signature | "skip".
async fn measure(
    kernel: &str,
    set: &str,
    image: Option<&str>,
) -> Option<std::collections::HashMap<(SetuidMode, ArgvProfile), String>> {
    let subjects: Vec<SubjectSpec> = CELLS
        .iter()
        .map(|(setuid, argv)| SubjectSpec::Bwrap {
            build: "system".into(),
            setuid: *setuid,
            argv: *argv,
        })
        .collect();
    let records = run_cells(kernel, set, image, &subjects, "add_file").await?;
    let mut out = std::collections::HashMap::new();
    for (i, c) in records.iter().enumerate() {
        let r = verdict(c);
        eprintln!(
            "{kernel:<13} {set:<15} {:<6?} {:<13} {r}   [{}]",
            CELLS[i].0,
            CELLS[i].1.as_str(),
            c.stderr_tail.trim()
        );
        out.insert(CELLS[i], r);
    }
    Some(out)
}

use ArgvProfile::*;
use SetuidMode::*;

#[tokio::test]
async fn qemu_matrix_nouserns_6_1() {
    let Some(d) = measure("nouserns-6.1", "default", None).await else {
        return;
    };
    // Measured: without setuid clone(CLONE_NEWUSER) gives EPERM here (bwrap's "No permissions"
    // message), with setuid EINVAL ("does not support user namespaces").
    assert_eq!(d[&(Never, Codex)], "userns-denied", "{d:?}");
    assert_eq!(d[&(Force, Codex)], "userns-unsupported", "{d:?}");
    assert_eq!(d[&(Force, CodexLegacy)], "pass", "{d:?}");
    let Some(d) = measure("nouserns-6.1", "unpriv-clone-0", None).await else {
        return;
    };
    assert!(
        d.values().all(|v| v.starts_with("skip")),
        "a missing sysctl must SKIP: {d:?}"
    );
}

/// `legacy_default`: what Codex's legacy argv gives under the default sysctls (measured: bullseye's
/// bwrap 0.4.1 cannot create the `--dev-bind /dev/null` target, every other build passes).
async fn debian(kernel: &str, image: Option<&str>, legacy_default: &str) {
    let Some(d) = measure(kernel, "default", image).await else {
        return;
    };
    assert_eq!(d[&(Never, Codex)], "pass", "{d:?}");
    assert_eq!(d[&(Force, Codex)], "pass", "{d:?}");
    assert_eq!(d[&(Never, CodexLegacy)], legacy_default, "{d:?}");
    assert_eq!(d[&(Force, CodexLegacy)], legacy_default, "{d:?}");
    let Some(d) = measure(kernel, "max-userns-0", image).await else {
        return;
    };
    assert_eq!(d[&(Never, Codex)], "userns-limit", "{d:?}");
    assert_eq!(d[&(Force, Codex)], "userns-limit", "{d:?}");
    let Some(d) = measure(kernel, "unpriv-clone-0", image).await else {
        return;
    };
    assert_eq!(d[&(Never, Codex)], "userns-denied-sysctl", "{d:?}");
    assert_eq!(d[&(Force, Codex)], "pass", "{d:?}");
}

#[tokio::test]
async fn qemu_matrix_debian_5_10() {
    debian("debian-5.10", None, "mount-denied").await;
}

#[tokio::test]
async fn qemu_matrix_debian_6_1() {
    debian("debian-6.1", None, "pass").await;
}

#[tokio::test]
async fn qemu_matrix_debian_6_12() {
    // With trixie's own bwrap 0.12 setuid is refused (facts §3b; the default matrix measures
    // that): the kernel's own behaviour is checked with bookworm's bwrap here.
    debian("debian-6.12", Some("bookworm"), "pass").await;
}

/// The Codex CLI `version` from npm (cached), as a cell's subject.
fn codex(version: &str) -> Option<SubjectSpec> {
    match nsmatrix::artifacts::npm::codex_package(version) {
        Ok(p) => Some(SubjectSpec::Codex {
            version: version.into(),
            codex_bin: p.codex,
            hide_system_bwrap: false,
            // Left to the guest's agent to read from `codex sandbox --help`, as it does for a
            // release the host could not read (`nsmatrix run` reads it on the host).
            entry: None,
        }),
        Err(e) => {
            common::require(false, &format!("Codex CLI {version} from npm: {e:#}"));
            None
        }
    }
}

/// The cell's Codex `v` ran from its disk at /opt/codex/VERSION and started the guest's
/// /usr/bin/bwrap.
fn ran_from_disk_with_system_bwrap(c: &CellRecord, v: &str) {
    assert_eq!(
        c.details["codex.path"],
        format!("/opt/codex/{v}/bin/codex"),
        "{c:?}"
    );
    assert!(
        c.details["codex.bwrap"].starts_with("/usr/bin/bwrap (system)"),
        "{c:?}"
    );
}

/// Codex in guests: every release of the batch comes on its own read-only disk, mounted by
/// the agent at /opt/codex/VERSION (not in the initramfs), and runs there as uid 1000 with the
/// bwrap it picks observed in /proc. One boot serves both releases.
#[tokio::test]
async fn qemu_codex_cells() {
    let (Some(pinned), Some(old)) = (codex("0.171.0"), codex("0.128.0")) else {
        return;
    };
    let both = [pinned, old];
    let Some(r) = run_cells("debian-6.1", "default", None, &both, "add_file").await else {
        return;
    };
    for (c, v) in r.iter().zip(["0.171.0", "0.128.0"]) {
        eprintln!(
            "debian-6.1 codex {v}: {} via {:?}",
            verdict(c),
            c.details.get("codex.bwrap")
        );
        assert_eq!(verdict(c), "pass", "codex {v}: {c:?}");
        ran_from_disk_with_system_bwrap(c, v);
        let witness = &c.details["codex.sandbox-witness"];
        assert!(
            witness.contains("/usr/bin/bwrap") && witness.contains("user"),
            "{witness}"
        );
    }
    let Some(r) = run_cells("nouserns-6.1", "default", None, &both, "add_file").await else {
        return;
    };
    for (c, v) in r.iter().zip(["0.171.0", "0.128.0"]) {
        eprintln!(
            "nouserns-6.1 codex {v}: {} via {:?}",
            verdict(c),
            c.details.get("codex.bwrap")
        );
    }
    // Measured: on a kernel without user namespaces both run the guest's unprivileged
    // /usr/bin/bwrap, which gets EPERM; 0.171.0 does not fall back to its bundled bwrap then.
    for (c, v) in r.iter().zip(["0.171.0", "0.128.0"]) {
        assert_eq!(verdict(c), "userns-denied", "codex {v}: {c:?}");
        ran_from_disk_with_system_bwrap(c, v);
        assert_eq!(c.details["codex.bwrap-setuid-effective"], "false", "{c:?}");
    }
}
