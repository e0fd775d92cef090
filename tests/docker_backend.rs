//! Real Docker, real agent: batches run in labelled containers that are always removed (after
//! a run, a hung cell, a timeout, a cancel, a run killed with SIGKILL), and what bwrap says in
//! them is measured, not assumed. Without an engine these tests skip loudly, or fail when
//! CI is set.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nsmatrix::backend::docker::{AgentPlacement, DockerBackend, connect};
use nsmatrix::backend::{BackendEvent, BatchCtx, BatchError, Stage};
use nsmatrix::matrix::model::{DockerEnv, EnvKind, Environment, ImageSource};
use nsmatrix::protocol::{
    AgentEvent, ArgvProfile, BatchSpec, CellRecord, CellSpec, Outcome, PROTOCOL_VERSION,
    SetuidMode, SubjectSpec,
};
use tokio_util::sync::CancellationToken;

const AGENT: &str = env!("CARGO_BIN_EXE_nsmatrix");

async fn engine() -> Option<DockerBackend> {
    match connect().await {
        Ok(b) => Some(b),
        Err(u) => {
            common::require(false, &format!("a Docker engine: {u}"));
            None
        }
    }
}

fn env(image: &str, profile: &str, uid: u32, read_only: bool) -> Environment {
    let profile = nsmatrix::matrix::profiles(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml"),
    )
    .expect("matrix.toml loads")
    .into_iter()
    .find(|p| p.name == profile)
    .expect("profile");
    Environment {
        id: format!(
            "docker-{image}-{}-uid{uid}{}",
            profile.name,
            if read_only { "-ro" } else { "" }
        ),
        name: "test".into(),
        axes: BTreeMap::new(),
        uid,
        kind: EnvKind::Docker(DockerEnv {
            image: image.into(),
            image_source: Some(ImageSource::Recipe(image.into())),
            profile: Some(profile),
            read_only,
            sysctls: BTreeMap::new(),
        }),
    }
}

/// A scenario that adds one file.
fn scenario(root: &Path) -> PathBuf {
    let d = root.join("add-file");
    std::fs::create_dir_all(d.join("expected")).unwrap();
    std::fs::create_dir_all(d.join("input")).unwrap();
    std::fs::write(d.join("input/keep.txt"), "keep\n").unwrap();
    std::fs::write(
        d.join("patch.txt"),
        "*** Begin Patch\n*** Add File: new.txt\n+hello\n*** End Patch\n",
    )
    .unwrap();
    std::fs::write(d.join("expected/new.txt"), "hello\n").unwrap();
    std::fs::write(d.join("expected/keep.txt"), "keep\n").unwrap();
    d
}

fn bwrap_cell(id: &str, dir: &Path, setuid: SetuidMode, argv: ArgvProfile) -> CellSpec {
    CellSpec {
        id: id.into(),
        subject: SubjectSpec::Bwrap {
            build: "system".into(),
            setuid,
            argv,
        },
        scenario_dir: dir.to_path_buf(),
        timeout_ms: 20_000,
        needs_sysctls: vec![],
    }
}

fn spec(agent: &Path, uid: u32, cells: Vec<CellSpec>) -> BatchSpec {
    BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: "b".into(),
        work_dir: "/unused-on-the-host".into(),
        uid,
        gid: uid,
        restrictions: Default::default(),
        sysctls: BTreeMap::new(),
        agent_bin: agent.to_path_buf(),
        kernel_log: None,
        cells,
    }
}

struct Ran {
    result: Result<(), BatchError>,
    records: Vec<CellRecord>,
    stages: Vec<String>,
    log: String,
    took: Duration,
}

async fn run(
    d: &DockerBackend,
    env: &Environment,
    spec: BatchSpec,
    run_id: &str,
    timeout: Duration,
    cancel: CancellationToken,
) -> Ran {
    let logs = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = BatchCtx {
        run_id: run_id.into(),
        batch_id: env.id.clone(),
        log_dir: logs.path().to_path_buf(),
        timeout,
        cancel,
        events: tx,
    };
    let t = Instant::now();
    let result = d.run_batch(env, spec, &ctx).await;
    let took = t.elapsed();
    drop(ctx);
    let (mut records, mut stages) = (Vec::new(), Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            BackendEvent::Agent {
                event: AgentEvent::CellFinished(r),
                ..
            } => records.push(r),
            BackendEvent::StageStarted { stage, .. } => stages.push(format!("+{}", stage.as_str())),
            BackendEvent::StageFinished { stage, .. } => {
                stages.push(format!("-{}", stage.as_str()))
            }
            _ => {}
        }
    }
    let log = std::fs::read_to_string(logs.path().join("agent.log")).unwrap_or_default();
    Ran {
        result,
        records,
        stages,
        log,
        took,
    }
}

async fn assert_no_containers(d: &DockerBackend, run_id: &str) {
    let left = d.run_containers(Some(run_id)).await.unwrap();
    assert!(
        left.is_empty(),
        "containers of run {run_id} left behind: {left:?}"
    );
}

fn run_id(tag: &str) -> String {
    format!("test-{tag}-{}", std::process::id())
}

fn message(r: &CellRecord) -> String {
    match &r.outcome {
        Outcome::Passed => "passed".into(),
        Outcome::Failed { signature, message } => format!("FAIL {signature}: {message}"),
        Outcome::Error { stage, message } => format!("ERROR {stage}: {message}"),
        Outcome::Skipped { reason } => format!("SKIP {reason}"),
    }
}

/// The incident, reproduced: Docker's default profile stops bwrap, and the legacy argv as
/// root prints exactly the incident's message. Stages come in order and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_profile_denies_userns_and_legacy_root_prints_the_incident_message() {
    let Some(d) = engine().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let sc = scenario(tmp.path());
    let id = run_id("incident");
    for uid in [1000, 0] {
        let cells = vec![
            bwrap_cell("codex", &sc, SetuidMode::AsIs, ArgvProfile::Codex),
            bwrap_cell("legacy", &sc, SetuidMode::AsIs, ArgvProfile::CodexLegacy),
        ];
        let e = env("bookworm", "default", uid, false);
        let r = run(
            &d,
            &e,
            spec(Path::new(AGENT), uid, cells),
            &id,
            Duration::from_secs(120),
            CancellationToken::new(),
        )
        .await;
        assert!(r.result.is_ok(), "{:?}\n{}", r.result, r.log);
        assert_eq!(
            r.stages,
            [
                "+provision",
                "-provision",
                "+start",
                "-start",
                "+run",
                "-run",
                "+teardown",
                "-teardown"
            ]
        );
        assert_eq!(r.records.len(), 2, "{}", r.log);
        for rec in &r.records {
            eprintln!("uid {uid} {}: {}", rec.id, message(rec));
        }
        let codex = message(&r.records[0]);
        assert!(
            codex.contains("No permissions to create"),
            "uid {uid}: {codex}"
        );
        if uid == 0 {
            let legacy = message(&r.records[1]);
            assert!(
                legacy.contains("bwrap: Creating new namespace failed: Operation not permitted"),
                "{legacy}"
            );
        }
    }
    assert_no_containers(&d, &id).await;
}

/// The work dir allows setuid even on a read-only root filesystem: a forced setuid copy
/// behaves like the image's own setuid bwrap (HolyClaude's compose: `capset` denied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_rootfs_keeps_setuid_copies_working() {
    let Some(d) = engine().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let sc = scenario(tmp.path());
    let id = run_id("ro");
    let mut seen = Vec::new();
    for (image, setuid, ro) in [
        ("bookworm-suid", SetuidMode::AsIs, false),
        ("bookworm", SetuidMode::Force, true),
    ] {
        let cells = vec![bwrap_cell("c", &sc, setuid, ArgvProfile::Codex)];
        let e = env(image, "holyclaude", 1000, ro);
        let r = run(
            &d,
            &e,
            spec(Path::new(AGENT), 1000, cells),
            &id,
            Duration::from_secs(120),
            CancellationToken::new(),
        )
        .await;
        assert!(r.result.is_ok(), "{:?}\n{}", r.result, r.log);
        let m = message(&r.records[0]);
        eprintln!("{image} {setuid:?} read-only={ro}: {m}");
        seen.push(m);
    }
    assert_eq!(
        seen[0], seen[1],
        "a setuid copy on the read-only rootfs behaves differently"
    );
    assert_no_containers(&d, &id).await;
}

/// A fake agent (a shell script placed like the real one) for the failure paths.
fn fake_agent(dir: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("fake-agent");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho '{{\"event\":\"hello\",\"version\":1,\"agent-version\":\"fake\",\"facts\":{{}}}}'\necho 'noise on stdout'\necho 'noise on stderr' >&2\n{body}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_cell_timeout_batch_timeout_cancel_and_crash_leave_nothing() {
    let Some(d) = engine().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let sc = scenario(tmp.path());
    let id = run_id("failures");
    let e = env("bookworm", "default", 1000, false);
    let hang = fake_agent(
        tmp.path(),
        "echo '{\"event\":\"cell-started\",\"id\":\"c\"}'\nexec sleep 1000",
    );
    let mut cell = bwrap_cell("c", &sc, SetuidMode::AsIs, ArgvProfile::Codex);

    // A cell past its own timeout (plus the agent's grace): killed by the harness.
    cell.timeout_ms = 500;
    let r = run(
        &d,
        &e,
        spec(&hang, 1000, vec![cell.clone()]),
        &id,
        Duration::from_secs(120),
        CancellationToken::new(),
    )
    .await;
    let err = r.result.unwrap_err();
    assert_eq!(err.stage, Stage::Run);
    assert!(err.message.contains("cell c did not finish"), "{err}");
    assert!(r.took < Duration::from_secs(30), "{:?}", r.took);
    assert!(
        r.log.contains("stdout: noise on stdout") && r.log.contains("stderr: noise on stderr"),
        "{}",
        r.log
    );
    assert_no_containers(&d, &id).await;

    // The batch's own timeout.
    cell.timeout_ms = 600_000;
    let r = run(
        &d,
        &e,
        spec(&hang, 1000, vec![cell.clone()]),
        &id,
        Duration::from_secs(3),
        CancellationToken::new(),
    )
    .await;
    let err = r.result.unwrap_err();
    assert!(err.message.contains("timed out"), "{err}");
    assert_no_containers(&d, &id).await;

    // Ctrl-C.
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        c2.cancel();
    });
    let r = run(
        &d,
        &e,
        spec(&hang, 1000, vec![cell.clone()]),
        &id,
        Duration::from_secs(120),
        cancel,
    )
    .await;
    assert_eq!(r.result.unwrap_err().message, "cancelled");
    assert!(r.took < Duration::from_secs(15), "{:?}", r.took);
    assert_no_containers(&d, &id).await;

    // An agent that dies before its batch is done: an error carrying its stderr.
    let crash = fake_agent(tmp.path(), "echo 'agent: exploded' >&2\nexit 3");
    let r = run(
        &d,
        &e,
        spec(&crash, 1000, vec![cell.clone()]),
        &id,
        Duration::from_secs(60),
        CancellationToken::new(),
    )
    .await;
    let err = r.result.unwrap_err();
    assert!(
        err.message.contains("code 3") && err.message.contains("agent: exploded"),
        "{err}"
    );
    assert_no_containers(&d, &id).await;

    // The future dropped half-way (a scheduler aborting its task): removed in the background.
    let d2 = d.clone();
    let (e2, s2, id2) = (e.clone(), spec(&hang, 1000, vec![cell.clone()]), id.clone());
    let task = tokio::spawn(async move {
        run(
            &d2,
            &e2,
            s2,
            &id2,
            Duration::from_secs(120),
            CancellationToken::new(),
        )
        .await;
    });
    let t = Instant::now();
    while d.run_containers(Some(&id)).await.unwrap().is_empty()
        && t.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
    let _ = task.await;
    let t = Instant::now();
    while !d.run_containers(Some(&id)).await.unwrap().is_empty()
        && t.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_containers(&d, &id).await;
}

/// A run killed with SIGKILL leaves its container; the next run's sweep removes it, and
/// leaves containers of live runs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_containers_of_killed_runs_only() {
    if std::env::var("NSMATRIX_TEST_KILLED_CHILD").is_ok() {
        return; // the child's own copy of this test
    }
    let Some(d) = engine().await else { return };
    let id = run_id("killed");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "killed_run_child", "--ignored", "--nocapture"])
        .env("NSMATRIX_TEST_KILLED_CHILD", &id)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while d.run_containers(Some(&id)).await.unwrap().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the child never started a container"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Alive: the sweep must not touch it.
    d.sweep().await.unwrap();
    assert_eq!(d.run_containers(Some(&id)).await.unwrap().len(), 1);
    child.kill().unwrap(); // SIGKILL: no clean-up runs in the child
    child.wait().unwrap();
    assert_eq!(
        d.run_containers(Some(&id)).await.unwrap().len(),
        1,
        "SIGKILL cannot clean up"
    );
    let removed = d.sweep().await.unwrap();
    assert!(removed >= 1);
    assert_no_containers(&d, &id).await;
}

/// Run by `sweep_removes_containers_of_killed_runs_only` in a child process: start a batch
/// that hangs, and wait to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn killed_run_child() {
    let Ok(id) = std::env::var("NSMATRIX_TEST_KILLED_CHILD") else {
        return;
    };
    let d = connect().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sc = scenario(tmp.path());
    let hang = fake_agent(tmp.path(), "exec sleep 1000");
    let cell = bwrap_cell("c", &sc, SetuidMode::AsIs, ArgvProfile::Codex);
    let e = env("bookworm", "default", 1000, false);
    run(
        &d,
        &e,
        spec(&hang, 1000, vec![cell]),
        &id,
        Duration::from_secs(600),
        CancellationToken::new(),
    )
    .await;
}

/// The full measurement: every catalog image × built-in profile × uid × argv × setuid mode.
/// Prints a table; asserts nothing about outcomes (they are what is measured).
/// `cargo test --test docker_backend -- --ignored measure --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_profiles_images_uids() {
    let Some(d) = engine().await else { return };
    let tmp = tempfile::tempdir().unwrap();
    let sc = scenario(tmp.path());
    let id = run_id("measure");
    let images = [
        "bookworm",
        "bookworm-suid",
        "trixie",
        "trixie-suid",
        "no-bwrap",
    ];
    for image in images {
        for p in nsmatrix::matrix::profiles(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml"),
        )
        .expect("matrix.toml loads")
        {
            for uid in [0, 1000] {
                let mut cells = Vec::new();
                for argv in [ArgvProfile::Codex, ArgvProfile::CodexLegacy] {
                    for setuid in [SetuidMode::AsIs, SetuidMode::Force, SetuidMode::Never] {
                        cells.push(bwrap_cell(
                            &format!("{}+{setuid:?}", argv.as_str()),
                            &sc,
                            setuid,
                            argv,
                        ));
                    }
                }
                let e = env(image, &p.name, uid, false);
                let r = run(
                    &d,
                    &e,
                    spec(Path::new(AGENT), uid, cells),
                    &id,
                    Duration::from_secs(300),
                    CancellationToken::new(),
                )
                .await;
                if let Err(err) = &r.result {
                    println!("| {image} | {} | {uid} | batch | {err} |", p.name);
                }
                for rec in &r.records {
                    let m = message(rec).replace('\n', " ");
                    let m: String = m.chars().take(160).collect();
                    println!("| {image} | {} | {uid} | {} | {m} |", p.name, rec.id);
                }
            }
        }
    }
    assert_no_containers(&d, &id).await;
}

/// Any local image works, even one with nothing but busybox: the static agent is placed in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_only_image_runs_the_placed_static_agent() {
    let Some(d) = engine().await else { return };
    // The upload path (what a remote engine gets): the agent travels in the tar.
    let d = d.with_agent_placement(AgentPlacement::Upload);
    let tmp = tempfile::tempdir().unwrap();
    let sc = scenario(tmp.path());
    // A tree with /bin/busybox and /bin/sh only, busybox taken from the cached Debian rootfs.
    let recipe = nsmatrix::artifacts::rootfs::RootfsRecipe::builtin("bookworm").unwrap();
    let root =
        tokio::task::spawn_blocking(move || nsmatrix::artifacts::rootfs::ensure_rootfs(&recipe))
            .await
            .unwrap()
            .expect("rootfs");
    let tarball = tmp.path().join("busybox.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
        b.append_path_with_name(root.join("bin/busybox"), "bin/busybox")
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "bin/sh", "busybox").unwrap();
        b.finish().unwrap();
    }
    let reference = format!("nsmatrix-test/busybox-only:{}", std::process::id());
    d.import_tarball(&tarball, &reference)
        .await
        .expect("import");
    let id = run_id("busybox");
    let mut e = env("bookworm", "default", 1000, false);
    if let EnvKind::Docker(d) = &mut e.kind {
        d.image = reference.clone();
        d.image_source = Some(ImageSource::Reference(reference.clone()));
    }
    let cells = vec![bwrap_cell("c", &sc, SetuidMode::AsIs, ArgvProfile::Codex)];
    let r = run(
        &d,
        &e,
        spec(Path::new(AGENT), 1000, cells),
        &id,
        Duration::from_secs(120),
        CancellationToken::new(),
    )
    .await;
    d.remove_image(&reference).await.unwrap();
    assert!(r.result.is_ok(), "{:?}\n{}", r.result, r.log);
    let m = message(&r.records[0]);
    eprintln!("busybox-only: {m}");
    assert!(m.contains("bwrap-missing"), "{m}");
    assert_no_containers(&d, &id).await;
}
