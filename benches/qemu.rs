//! Per kernel under the probed accelerator, side by side (interleaved, median of
//! `NSMATRIX_BENCH_RUNS`, default 3): a bare boot (same kernel, base initramfs and QEMU flags,
//! an init that ends the guest at once), a batch of 1 cell and of 12 cells (the per-batch initramfs
//! included), their ratio to the bare boot and a cell's marginal cost; then batches of 1 and 12
//! cells in a two-vCPU guest, whose agent runs the cells two at a time, and their marginal cost.
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
        kernel_log: None,
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

async fn once(b: &QemuBackend, kernel: &str, cells: usize, vcpus: u32) -> GuestTimings {
    let env = Environment {
        id: format!("bench-{kernel}"),
        name: "bench".into(),
        axes: BTreeMap::new(),
        uid: 1000,
        kind: EnvKind::Qemu(QemuEnv {
            kernel: kernel.into(),
            image: None,
            sysctls: BTreeMap::new(),
            profile: None,
            apparmor: "none".into(),
            vcpus,
        }),
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = BatchCtx {
        run_id: "bench".into(),
        batch_id: format!("bench-{kernel}-{cells}-{vcpus}"),
        log_dir: std::env::temp_dir().join(format!("nsmatrix-bench/{kernel}-{cells}-{vcpus}")),
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
        "{:<14} {:>8} {:>8} {:>10} {:>10} {:>12} {:>12} {:>12} {:>14} {:>16}",
        "kernel",
        "bare s",
        "boot s",
        "1 cell s",
        "12 cells s",
        "1 cell/bare",
        "12 cells/bare",
        "per cell ms",
        "12 cells 2vCPU",
        "per cell 2vCPU ms"
    );
    for k in kernels {
        once(&b, &k, 1, 1).await; // warm the cache
        let (mut bare, mut boot, mut one, mut twelve) = (vec![], vec![], vec![], vec![]);
        let (mut one2, mut twelve2) = (vec![], vec![]);
        for _ in 0..runs {
            bare.push(
                b.bare_boot(&k)
                    .await
                    .unwrap_or_else(|e| panic!("{k}: {e:#}"))
                    .as_secs_f64(),
            );
            let t = once(&b, &k, 1, 1).await;
            boot.push(t.boot.unwrap_or_default().as_secs_f64());
            one.push((t.provision + t.total).as_secs_f64());
            let t = once(&b, &k, 12, 1).await;
            twelve.push((t.provision + t.total).as_secs_f64());
            // The same with two vCPUs, whose agent runs the cells two at a time.
            let t = once(&b, &k, 1, 2).await;
            one2.push((t.provision + t.total).as_secs_f64());
            let t = once(&b, &k, 12, 2).await;
            twelve2.push((t.provision + t.total).as_secs_f64());
        }
        let (bare, one, twelve) = (median(bare), median(one), median(twelve));
        let (one2, twelve2) = (median(one2), median(twelve2));
        println!(
            "{k:<14} {bare:>8.2} {:>8.2} {one:>10.2} {twelve:>10.2} {:>12.2} {:>12.2} {:>12.0} {twelve2:>14.2} {:>16.0}",
            median(boot),
            one / bare,
            twelve / bare,
            (twelve - one) / 11.0 * 1000.0,
            (twelve2 - one2) / 11.0 * 1000.0
        );
    }
}
