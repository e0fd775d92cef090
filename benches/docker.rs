//! Per-cell cost inside one running container (nsmatrix's batches) against a shell loop of
//! `docker run --rm` doing the same work, one container per cell.
//!
//! `cargo bench --bench docker` (needs a Docker engine and the `docker` CLI for the baseline).
//! NSMATRIX_BENCH_CELLS (default 20), NSMATRIX_BENCH_PROFILE (default `holyclaude+net-admin`:
//! with uid 0 and the legacy argv every cell really runs bwrap and apply_patch and passes), NSMATRIX_BENCH_IMAGE (default `bookworm`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nsmatrix::backend::docker::{DockerBackend, connect};
use nsmatrix::backend::{BackendEvent, BatchCtx};
use nsmatrix::matrix::model::{DockerEnv, EnvKind, Environment, ImageSource};
use nsmatrix::protocol::{
    AgentEvent, ArgvProfile, BatchSpec, CellSpec, Outcome, PROTOCOL_VERSION, SetuidMode,
    SubjectSpec,
};
use tokio_util::sync::CancellationToken;

const AGENT: &str = env!("CARGO_BIN_EXE_nsmatrix");

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; there is nothing to list
    }
    let cells: usize = std::env::var("NSMATRIX_BENCH_CELLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(2);
    let profile =
        std::env::var("NSMATRIX_BENCH_PROFILE").unwrap_or_else(|_| "holyclaude+net-admin".into());
    let image = std::env::var("NSMATRIX_BENCH_IMAGE").unwrap_or_else(|_| "bookworm".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bench(cells, &profile, &image));
}

async fn bench(n: usize, profile: &str, image: &str) {
    let d = match connect().await {
        Ok(d) => d,
        Err(u) => {
            eprintln!("SKIPPED: no Docker engine: {u}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let sc = scenario(tmp.path());
    let env = environment(image, profile);
    let image_ref = d.ensure_image(image).await.expect("image");

    // Warm-up: page cache, image layers.
    batch(&d, &env, &sc, 1).await;
    let (t1, ok1) = batch(&d, &env, &sc, 1).await;
    let (tn, okn) = batch(&d, &env, &sc, n).await;
    let marginal = (tn.saturating_sub(t1)).as_secs_f64() / (n - 1) as f64;
    println!(
        "image {image}, profile {profile}, {n} cells; cells passed: {okn}/{n} (1-cell batch: {ok1}/1)"
    );
    println!(
        "nsmatrix batch, 1 cell:           {:>8.3} s",
        t1.as_secs_f64()
    );
    println!(
        "nsmatrix batch, {n} cells:         {:>8.3} s",
        tn.as_secs_f64()
    );
    println!("  marginal cost per cell:          {:>8.3} s", marginal);

    let mut per_container_api = Duration::ZERO;
    for _ in 0..n {
        per_container_api += batch(&d, &env, &sc, 1).await.0;
    }
    println!(
        "nsmatrix, one container per cell:  {:>8.3} s ({:.3} s per cell)",
        per_container_api.as_secs_f64(),
        per_container_api.as_secs_f64() / n as f64
    );

    match docker_run_loop(tmp.path(), &sc, &image_ref, profile, n) {
        Some(loop_t) => {
            let per = loop_t.as_secs_f64() / n as f64;
            println!(
                "shell loop of `docker run --rm`:   {:>8.3} s ({per:.3} s per cell)",
                loop_t.as_secs_f64()
            );
            println!(
                "ratio, marginal per-cell cost / docker run per cell: {:.3}",
                marginal / per
            );
            println!(
                "ratio, whole {n}-cell batch / whole docker run loop:   {:.3}",
                tn.as_secs_f64() / loop_t.as_secs_f64()
            );
        }
        None => println!("shell loop of `docker run --rm`: skipped (no docker CLI)"),
    }
}

fn environment(image: &str, profile: &str) -> Environment {
    let profile = nsmatrix::matrix::profiles(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml"),
    )
    .expect("matrix.toml loads")
    .into_iter()
    .find(|p| p.name == profile)
    .expect("a built-in profile");
    Environment {
        id: format!("bench-{image}-{}", profile.name),
        name: "bench".into(),
        axes: BTreeMap::new(),
        uid: 0,
        kind: EnvKind::Docker(DockerEnv {
            image: image.into(),
            image_source: Some(ImageSource::Recipe(image.into())),
            profile: Some(profile),
            read_only: false,
            sysctls: BTreeMap::new(),
        }),
    }
}

fn scenario(root: &Path) -> PathBuf {
    let d = root.join("add-file");
    std::fs::create_dir_all(d.join("expected")).unwrap();
    std::fs::write(
        d.join("patch.txt"),
        "*** Begin Patch\n*** Add File: new.txt\n+hello\n*** End Patch\n",
    )
    .unwrap();
    std::fs::write(d.join("expected/new.txt"), "hello\n").unwrap();
    d
}

fn spec(agent: &Path, sc: &Path, n: usize) -> BatchSpec {
    BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: "bench".into(),
        work_dir: "/nsmatrix-work/batch".into(),
        uid: 0,
        gid: 0,
        restrictions: Default::default(),
        sysctls: BTreeMap::new(),
        agent_bin: agent.to_path_buf(),
        kernel_log: None,
        cells: (0..n)
            .map(|i| CellSpec {
                id: format!("c{i}"),
                subject: SubjectSpec::Bwrap {
                    build: "system".into(),
                    setuid: SetuidMode::AsIs,
                    argv: ArgvProfile::CodexLegacy,
                },
                scenario_dir: sc.to_path_buf(),
                timeout_ms: 60_000,
                needs_sysctls: vec![],
            })
            .collect(),
    }
}

async fn batch(d: &DockerBackend, env: &Environment, sc: &Path, n: usize) -> (Duration, usize) {
    let logs = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = BatchCtx {
        run_id: format!("bench-{}", std::process::id()),
        batch_id: env.id.clone(),
        log_dir: logs.path().to_path_buf(),
        timeout: Duration::from_secs(600),
        cancel: CancellationToken::new(),
        events: tx,
    };
    let t = Instant::now();
    d.run_batch(env, spec(Path::new(AGENT), sc, n), &ctx)
        .await
        .expect("batch");
    let took = t.elapsed();
    drop(ctx);
    let mut passed = 0;
    while let Some(ev) = rx.recv().await {
        if let BackendEvent::Agent {
            event: AgentEvent::CellFinished(r),
            ..
        } = ev
            && r.outcome == Outcome::Passed
        {
            passed += 1;
        }
    }
    (took, passed)
}

/// The baseline: what one would script without nsmatrix: a container per cell, the agent and
/// the scenario bind-mounted (cheaper than nsmatrix's upload), the same security flags.
fn docker_run_loop(
    tmp: &Path,
    sc: &Path,
    image: &str,
    profile: &str,
    n: usize,
) -> Option<Duration> {
    Command::new("docker")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let p = nsmatrix::matrix::profiles(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml"),
    )
    .expect("matrix.toml loads")
    .into_iter()
    .find(|p| p.name == profile)?;
    let mut flags =
        vec!["--network none --init --user 0:0 --tmpfs /nsmatrix-work:rw,exec,suid".to_string()];
    if p.privileged {
        flags.push("--privileged".into());
    }
    if let Some(s) = &p.seccomp {
        flags.push(format!("--security-opt seccomp={s}"));
    }
    for c in &p.cap_add {
        flags.push(format!("--cap-add {c}"));
    }
    if p.no_new_privileges {
        flags.push("--security-opt no-new-privileges".into());
    }
    if p.systempaths_unconfined {
        flags.push("--security-opt systempaths=unconfined".into());
    }
    let mut one = spec(
        Path::new("/nsmatrix/bin/nsmatrix"),
        Path::new("/nsmatrix/scenarios/0-add-file"),
        1,
    );
    one.work_dir = "/nsmatrix-work/batch".into();
    let spec_path = tmp.join("one.json");
    std::fs::write(&spec_path, serde_json::to_vec(&one).unwrap()).unwrap();
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do docker run --rm {} -v {AGENT}:/nsmatrix/bin/nsmatrix:ro -v {}:/nsmatrix/scenarios/0-add-file:ro -v {}:/nsmatrix/batch.json:ro {image} /nsmatrix/bin/nsmatrix agent --batch /nsmatrix/batch.json >/dev/null || exit 1; i=$((i+1)); done",
        flags.join(" "),
        sc.display(),
        spec_path.display()
    );
    let t = Instant::now();
    let ok = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .status()
        .ok()?
        .success();
    ok.then(|| t.elapsed())
}
