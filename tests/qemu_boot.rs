//! Real guests under QEMU: each kernel family boots, runs a batch through nsmatrix as its init and
//! powers off; a guest that panics or hangs is reported as a `BatchError` with its console tail.
//! Without qemu these tests fail when `CI` is set (see tests/common) and are skipped loudly otherwise.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nsmatrix::backend::qemu::QemuBackend;
use nsmatrix::backend::{BackendEvent, BatchCtx, BatchError, Stage};
use nsmatrix::matrix::model::{EnvKind, Environment, QemuEnv};
use nsmatrix::protocol::*;
use tokio_util::sync::CancellationToken;

fn env(kernel: &str, set: &str, sysctls: &[(&str, &str)]) -> Environment {
    Environment {
        id: format!("qemu-{kernel}-{set}"),
        name: "qemu".into(),
        axes: BTreeMap::new(),
        uid: 1000,
        kind: EnvKind::Qemu(QemuEnv {
            kernel: kernel.into(),
            image: None,
            sysctls: sysctls
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            profile: None,
            apparmor: "none".into(),
            vcpus: 1,
        }),
    }
}

fn scenario_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/add_file")
}

fn spec(batch: &str, cells: &[(SetuidMode, ArgvProfile)], needs: &[&str]) -> BatchSpec {
    BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: batch.into(),
        work_dir: "/unused-on-host".into(),
        uid: 1000,
        gid: 1000,
        restrictions: Default::default(),
        sysctls: BTreeMap::new(),
        agent_bin: PathBuf::from(env!("CARGO_BIN_EXE_nsmatrix")),
        kernel_log: None,
        cells: cells
            .iter()
            .enumerate()
            .map(|(i, (setuid, argv))| CellSpec {
                id: format!("{batch}/bwrap-{setuid:?}-{}/{i}", argv.as_str()),
                subject: SubjectSpec::Bwrap {
                    build: "system".into(),
                    setuid: *setuid,
                    argv: *argv,
                },
                scenario_dir: scenario_dir(),
                timeout_ms: 30_000,
                needs_sysctls: needs.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
    }
}

async fn backend() -> Option<QemuBackend> {
    match QemuBackend::probe().await {
        Ok(b) => Some(b),
        Err(u) => {
            common::require(false, &format!("the qemu backend: {u}"));
            None
        }
    }
}

struct Run {
    result: Result<(), BatchError>,
    events: Vec<AgentEvent>,
    elapsed: Duration,
}

async fn run(b: &QemuBackend, env: &Environment, spec: BatchSpec, timeout: Duration) -> Run {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let log_dir = std::env::temp_dir().join(format!("nsmatrix-qemu-test-logs/{}", spec.batch_id));
    let ctx = BatchCtx {
        run_id: "test".into(),
        batch_id: spec.batch_id.clone(),
        log_dir,
        timeout,
        cancel: CancellationToken::new(),
        events: tx,
    };
    // The kernel first, through the binary (on a fresh machine it is fetched or built here,
    // once, whichever test comes first): what the tests time is the guest, not a kernel build.
    let kernel = &env.qemu().expect("a qemu environment").kernel;
    let fetched = std::process::Command::new(env!("CARGO_BIN_EXE_nsmatrix"))
        .args(["kernels", "fetch", kernel])
        .status()
        .expect("nsmatrix runs");
    assert!(
        fetched.success(),
        "nsmatrix kernels fetch {kernel}: {fetched}"
    );
    // The backend adds its part (the environment's sysctls) as the plan does.
    let spec = nsmatrix::backend::Backend::prepare(b, "test", env, spec);
    let t = std::time::Instant::now();
    let result = b.run_batch_timed(env, spec, &ctx).await;
    eprintln!("timings: {:?}", result.as_ref().ok());
    let result = result.map(|_| ());
    let mut elapsed = t.elapsed();
    drop(ctx);
    let mut events = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            BackendEvent::Agent { event, .. } => events.push(event),
            // The guest's own time: without provisioning (the root file system and the base
            // initramfs, built here on a fresh machine).
            BackendEvent::StageFinished {
                stage: Stage::Provision,
                elapsed: p,
                ..
            } => elapsed = elapsed.saturating_sub(p),
            _ => {}
        }
    }
    Run {
        result,
        events,
        elapsed,
    }
}

fn finished(r: &Run) -> Vec<&CellRecord> {
    r.events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::CellFinished(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn summary(r: &Run) -> String {
    finished(r)
        .iter()
        .map(|c| format!("{} => {:?} {}", c.id, c.outcome, c.stderr_tail.trim()))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn boots_and_runs(kernel: &str) {
    let Some(b) = backend().await else { return };
    let cells = [
        (SetuidMode::Never, ArgvProfile::Codex),
        (SetuidMode::Force, ArgvProfile::Codex),
    ];
    let r = run(
        &b,
        &env(kernel, "default", &[]),
        spec(&format!("boot-{kernel}"), &cells, &[]),
        Duration::from_secs(240),
    )
    .await;
    eprintln!(
        "{kernel}: {:?} in {:?} ({})\n{}",
        r.result,
        r.elapsed,
        b.accel_note,
        summary(&r)
    );
    r.result
        .as_ref()
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    assert!(
        matches!(r.events.first(), Some(AgentEvent::Hello { .. })),
        "{:?}",
        r.events.first()
    );
    assert_eq!(finished(&r).len(), cells.len());
    assert!(matches!(
        r.events.last(),
        Some(AgentEvent::BatchDone { .. })
    ));
}

#[tokio::test]
async fn qemu_debian_5_10_boots_and_runs_a_batch() {
    boots_and_runs("debian-5.10").await;
}

#[tokio::test]
async fn qemu_debian_6_1_boots_and_runs_a_batch() {
    boots_and_runs("debian-6.1").await;
}

#[tokio::test]
async fn qemu_debian_6_12_boots_and_runs_a_batch() {
    boots_and_runs("debian-6.12").await;
}

#[tokio::test]
async fn qemu_nouserns_6_1_boots_and_runs_a_batch() {
    boots_and_runs("nouserns-6.1").await;
}

/// A guest whose init dies panics the kernel: the batch ends in ERROR with the console tail,
/// well within its timeout.
#[tokio::test]
async fn qemu_panicking_guest_is_a_batch_error_with_console_tail() {
    let Some(b) = backend().await else { return };
    let mut s = spec("panic", &[(SetuidMode::Never, ArgvProfile::Codex)], &[]);
    // A static busybox as init: "nsmatrix: applet not found", init exits, the kernel panics.
    s.agent_bin = PathBuf::from("/bin/busybox");
    let timeout = Duration::from_secs(120);
    let r = run(&b, &env("nouserns-6.1", "default", &[]), s, timeout).await;
    let e = r.result.expect_err("a panicking guest must be an error");
    eprintln!("{e}");
    assert!(e.message.contains("panic"), "{e}");
    assert!(e.message.contains("console tail"), "{e}");
    assert!(r.elapsed < timeout / 2, "took {:?}", r.elapsed);
}

/// A guest that does not get its agent going in time is stopped at the deadline.
#[tokio::test]
async fn qemu_hanging_guest_is_stopped_at_its_timeout() {
    let Some(b) = backend().await else { return };
    let s = spec("hang", &[(SetuidMode::Never, ArgvProfile::Codex)], &[]);
    let timeout = Duration::from_millis(1500);
    let r = run(&b, &env("nouserns-6.1", "default", &[]), s, timeout).await;
    let e = r
        .result
        .expect_err("a guest past its deadline must be an error");
    eprintln!("{e}");
    assert_eq!(e.stage, Stage::Start, "{e}");
    assert!(e.message.contains("console tail"), "{e}");
    assert!(r.elapsed < Duration::from_secs(30), "took {:?}", r.elapsed);
}

/// The facts a batch reports are those its cells run under: the agent applies the sysctls
/// before it says Hello, so a max-userns-0 guest reports 0 (not the kernel's default), and
/// the cell sees the limit.
#[tokio::test]
async fn qemu_facts_are_recorded_after_the_sysctls_are_applied() {
    let Some(b) = backend().await else { return };
    let sysctls = [("user.max_user_namespaces", "0")];
    let mut s = spec(
        "facts-max-userns-0",
        &[(SetuidMode::Never, ArgvProfile::Codex)],
        &["user.max_user_namespaces"],
    );
    s.sysctls = sysctls
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let r = run(
        &b,
        &env("debian-6.1", "max-userns-0", &sysctls),
        s,
        Duration::from_secs(240),
    )
    .await;
    r.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let Some(AgentEvent::Hello { facts, .. }) = r.events.first() else {
        panic!("no Hello first: {:?}", r.events.first());
    };
    assert_eq!(
        facts.get("user.max_user_namespaces").map(String::as_str),
        Some("0"),
        "{facts:?}"
    );
    let cells = finished(&r);
    assert_eq!(cells.len(), 1);
    assert!(
        matches!(&cells[0].outcome, Outcome::Failed { signature, .. } if signature == "userns-limit"),
        "{}",
        summary(&r)
    );
}
