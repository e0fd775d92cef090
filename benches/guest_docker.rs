//! Engine guests under TCG, per kernel: a bare boot (QEMU start to power-off), a boot to an
//! engine that answers (with the bookworm image's data disk), a container's start inside the
//! guest (create to the agent's hello) and a cell's marginal cost in a running container there
//! (a batch of 11 cells against one of 1, through the guest-docker backend as `nsmatrix run`
//! drives it). Median of `NSMATRIX_BENCH_RUNS` (default 1) runs.
//! `cargo bench --bench guest_docker [-- KERNEL...]` (default synology-like-5.10), as root with
//! QEMU and a Docker engine on the host (the image is built there).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nsmatrix::backend::guest_docker::GuestDockerBackend;
use nsmatrix::backend::{Backend, BackendEvent, BatchCtx, Stage};
use nsmatrix::guest_engine::{self, EngineOptions};
use nsmatrix::matrix::model::{
    DockerEnv, EnvKind, Environment, GuestDockerEnv, ImageSource, Profile,
};
use nsmatrix::protocol::*;
use tokio_util::sync::CancellationToken;

fn spec(cells: usize) -> BatchSpec {
    BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: format!("bench-{cells}"),
        work_dir: "/nsmatrix-work/bench".into(),
        uid: 1000,
        gid: 1000,
        restrictions: Default::default(),
        sysctls: BTreeMap::new(),
        agent_bin: PathBuf::from(env!("CARGO_BIN_EXE_nsmatrix")),
        cells: (0..cells)
            .map(|i| CellSpec {
                id: i.to_string(),
                subject: SubjectSpec::Bwrap {
                    build: "system".into(),
                    setuid: SetuidMode::Never,
                    argv: ArgvProfile::Codex,
                },
                scenario_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/add_file"),
                timeout_ms: 60_000,
                needs_sysctls: vec![],
            })
            .collect(),
    }
}

fn env(kernel: &str) -> Environment {
    Environment {
        id: format!("bench-{kernel}"),
        name: "bench".into(),
        axes: BTreeMap::new(),
        uid: 1000,
        kind: EnvKind::GuestDocker(GuestDockerEnv {
            kernel: kernel.into(),
            sysctls: BTreeMap::new(),
            container: DockerEnv {
                image: "bookworm".into(),
                image_source: Some(ImageSource::Recipe("bookworm".into())),
                profile: Some(Profile {
                    name: "default".into(),
                    ..Default::default()
                }),
                read_only: false,
                sysctls: BTreeMap::new(),
            },
        }),
    }
}

/// One batch through the backend: (container start, run) from its stage events.
async fn batch(b: &GuestDockerBackend, e: &Environment, cells: usize) -> (Duration, Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = BatchCtx {
        run_id: "bench".into(),
        batch_id: format!("bench-{cells}"),
        log_dir: std::env::temp_dir().join(format!("nsmatrix-bench/guest-docker-{cells}")),
        timeout: Duration::from_secs(600),
        cancel: CancellationToken::new(),
        events: tx,
    };
    b.run_batch(e, spec(cells), &ctx)
        .await
        .expect("the batch runs");
    drop(ctx);
    let (mut start, mut run) = (Duration::ZERO, Duration::ZERO);
    while let Some(ev) = rx.recv().await {
        if let BackendEvent::StageFinished { stage, elapsed, .. } = ev {
            match stage {
                Stage::Start => start += elapsed,
                Stage::Run => run += elapsed,
                _ => {}
            }
        }
    }
    (start, run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let kernels: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let kernels = if kernels.is_empty() {
        vec!["synology-like-5.10".to_string()]
    } else {
        kernels
    };
    let runs: usize = std::env::var("NSMATRIX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let host = nsmatrix::backend::docker::connect()
            .await
            .expect("a Docker engine on the host");
        let image = host
            .ensure_image("bookworm")
            .await
            .expect("the bookworm image");
        for k in &kernels {
            let (mut bare, mut ready, mut start, mut marginal) = (vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                bare.push(guest_engine::bare_boot(k).await.unwrap().as_secs_f64());
                let (engine, _) = guest_engine::data::start_with_images(
                    EngineOptions::new(k),
                    std::slice::from_ref(&image),
                )
                .await
                .unwrap();
                ready.push(engine.timings.ready.as_secs_f64());
                engine.shutdown().await.unwrap();

                let b = GuestDockerBackend::probe().await.expect("guest-docker");
                let e = env(k);
                // Two batches of one guest: it boots with the first and stops after the second.
                let _ = b.prepare("bench", &e, spec(1));
                let _ = b.prepare("bench", &e, spec(11));
                let (s1, r1) = batch(&b, &e, 1).await;
                let (s11, r11) = batch(&b, &e, 11).await;
                b.end_run("bench", false).await;
                start.push((s1.as_secs_f64() + s11.as_secs_f64()) / 2.0);
                marginal.push((r11.as_secs_f64() - r1.as_secs_f64()) / 10.0);
            }
            let (bare, ready) = (median(bare), median(ready));
            println!(
                "{k}: bare boot {bare:.1} s; engine ready {ready:.1} s (ratio {:.1}, target <= 2); container start {:.1} s; marginal cell {:.0} ms (target <= 100 ms); {runs} run(s)",
                ready / bare,
                median(start),
                median(marginal) * 1000.0
            );
        }
    });
}
