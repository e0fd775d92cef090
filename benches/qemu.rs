//! Boot-to-first-result and whole-batch time per kernel under the probed accelerator, median of
//! `NSMATRIX_BENCH_RUNS` (default 3) runs, and a cell's marginal cost (11 cells vs 1).
//! `cargo bench --bench qemu [-- KERNEL...]`. Needs qemu and the kernels (fetched/built on use).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nsmatrix::backend::BatchCtx;
use nsmatrix::backend::qemu::{GuestTimings, QemuBackend};
use nsmatrix::matrix::model::{EnvKind, Environment, QemuEnv};
use nsmatrix::protocol::*;
use tokio_util::sync::CancellationToken;

fn spec(cells: usize) -> BatchSpec {
    BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: format!("bench-{cells}"),
        work_dir: "/unused".into(),
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
                timeout_ms: 30_000,
                needs_sysctls: vec![],
            })
            .collect(),
    }
}

async fn once(b: &QemuBackend, kernel: &str, cells: usize) -> GuestTimings {
    let env = Environment {
        id: format!("bench-{kernel}"),
        name: "bench".into(),
        axes: BTreeMap::new(),
        uid: 1000,
        kind: EnvKind::Qemu(QemuEnv {
            kernel: kernel.into(),
            image: None,
            sysctls: BTreeMap::new(),
        }),
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = BatchCtx {
        run_id: "bench".into(),
        batch_id: format!("bench-{kernel}-{cells}"),
        log_dir: std::env::temp_dir().join(format!("nsmatrix-bench/{kernel}-{cells}")),
        timeout: Duration::from_secs(300),
        cancel: CancellationToken::new(),
        events: tx,
    };
    b.run_batch_timed(&env, spec(cells), &ctx)
        .await
        .unwrap_or_else(|e| panic!("{kernel}: {e}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let b = QemuBackend::probe().await.expect("qemu backend");
    let runs: usize = std::env::var("NSMATRIX_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let kernels = if args.is_empty() {
        vec![
            "nouserns-6.1".to_string(),
            "debian-5.10".into(),
            "debian-6.1".into(),
            "debian-6.12".into(),
        ]
    } else {
        args
    };
    println!("accelerator: {}; median of {runs} runs", b.accel_note);
    println!(
        "{:<14} {:>10} {:>14} {:>12} {:>12} {:>14}",
        "kernel", "boot s", "first result s", "1 cell s", "11 cells s", "per cell ms"
    );
    for k in kernels {
        once(&b, &k, 1).await; // warm the cache
        let (mut boot, mut first, mut one, mut eleven) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let t = once(&b, &k, 1).await;
            boot.push(t.boot.unwrap_or_default().as_secs_f64());
            first.push(t.first_result.unwrap_or_default().as_secs_f64());
            one.push(t.total.as_secs_f64());
            eleven.push(once(&b, &k, 11).await.total.as_secs_f64());
        }
        let (one, eleven) = (median(one), median(eleven));
        println!(
            "{k:<14} {:>10.2} {:>14.2} {:>12.2} {:>12.2} {:>14.0}",
            median(boot),
            median(first),
            one,
            eleven,
            (eleven - one) * 100.0
        );
    }
}
