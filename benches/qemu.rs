//! Per kernel under the probed accelerator, side by side (interleaved, median of
//! `NSMATRIX_BENCH_RUNS`, default 3): a bare boot (same kernel, base initramfs and QEMU flags,
//! an init that ends the guest at once), a batch of 1 cell and of 12 cells (the per-batch initramfs
//! included), their ratio to the bare boot and a cell's marginal cost (with, less noisy, the
//! median of the cells' own durations as the guest's agent measured them); then batches of 1 and 12
//! cells in a two-vCPU guest, whose agent runs the cells two at a time, and their marginal cost.
//! `cargo bench --bench qemu [-- KERNEL...]`. Needs qemu and the kernels (fetched/built on use).
//! With `NSMATRIX_BENCH_QEMU_COMPARE=/path/to/other/qemu-system-x86_64` the same series also runs
//! on that QEMU, interleaved with the first (one row per kernel and QEMU).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nsmatrix::backend::qemu::{GuestTimings, QemuBackend, version};
use nsmatrix::backend::{BackendEvent, BatchCtx};
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

/// A batch's guest timings and the durations its agent measured for its cells (ms).
async fn once(b: &QemuBackend, kernel: &str, cells: usize, vcpus: u32) -> GuestTimings {
    once_cells(b, kernel, cells, vcpus).await.0
}

async fn once_cells(
    b: &QemuBackend,
    kernel: &str,
    cells: usize,
    vcpus: u32,
) -> (GuestTimings, Vec<f64>) {
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = BatchCtx {
        run_id: "bench".into(),
        batch_id: format!("bench-{kernel}-{cells}-{vcpus}"),
        log_dir: std::env::temp_dir().join(format!("nsmatrix-bench/{kernel}-{cells}-{vcpus}")),
        timeout: Duration::from_secs(300),
        cancel: CancellationToken::new(),
        events: tx,
    };
    let t = b
        .run_batch_timed(&env, spec(cells), &ctx)
        .await
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    drop(ctx);
    let mut durations = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let BackendEvent::Agent {
            event: AgentEvent::CellFinished(r),
            ..
        } = ev
        {
            durations.push(r.duration_ms as f64);
        }
    }
    (t, durations)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[derive(Default)]
struct Series {
    bare: Vec<f64>,
    boot: Vec<f64>,
    one: Vec<f64>,
    twelve: Vec<f64>,
    one2: Vec<f64>,
    twelve2: Vec<f64>,
    /// Every cell's own duration in the 12-cell one-vCPU batches, as its agent measured it.
    cell: Vec<f64>,
}

impl Series {
    async fn sample(&mut self, b: &QemuBackend, k: &str) {
        self.bare.push(
            b.bare_boot(k)
                .await
                .unwrap_or_else(|e| panic!("{k}: {e:#}"))
                .as_secs_f64(),
        );
        let t = once(b, k, 1, 1).await;
        self.boot.push(t.boot.unwrap_or_default().as_secs_f64());
        self.one.push((t.provision + t.total).as_secs_f64());
        let (t, cells) = once_cells(b, k, 12, 1).await;
        self.twelve.push((t.provision + t.total).as_secs_f64());
        self.cell.extend(cells);
        // The same with two vCPUs, whose agent runs the cells two at a time.
        let t = once(b, k, 1, 2).await;
        self.one2.push((t.provision + t.total).as_secs_f64());
        let t = once(b, k, 12, 2).await;
        self.twelve2.push((t.provision + t.total).as_secs_f64());
    }

    fn print(self, label: &str) {
        let (bare, one, twelve) = (median(self.bare), median(self.one), median(self.twelve));
        let (one2, twelve2) = (median(self.one2), median(self.twelve2));
        println!(
            "{label:<24} {bare:>8.2} {:>8.2} {one:>10.2} {twelve:>10.2} {:>12.2} {:>12.2} {:>12.0} {:>14.0} {twelve2:>14.2} {:>16.0}",
            median(self.boot),
            one / bare,
            twelve / bare,
            (twelve - one) / 11.0 * 1000.0,
            median(self.cell),
            (twelve2 - one2) / 11.0 * 1000.0
        );
    }
}

/// "7.2" from QEMU's `--version` line.
fn short_version(line: &str) -> String {
    version::parse(line).map_or_else(|| "?".into(), |(major, minor)| format!("{major}.{minor}"))
}

#[tokio::main]
async fn main() {
    let b = QemuBackend::probe().await.expect("qemu backend");
    let mut backends = vec![b.clone()];
    if let Some(other) = std::env::var_os("NSMATRIX_BENCH_QEMU_COMPARE") {
        let mut o = b.clone();
        o.qemu = PathBuf::from(other);
        o.version = version::version_line(&o.qemu).unwrap_or_else(|e| panic!("{e}"));
        backends.push(o);
    }
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
    for q in &backends {
        println!("{}: {}", q.qemu.display(), q.version);
    }
    println!(
        "{:<24} {:>8} {:>8} {:>10} {:>10} {:>12} {:>12} {:>12} {:>14} {:>14} {:>16}",
        "kernel, qemu",
        "bare s",
        "boot s",
        "1 cell s",
        "12 cells s",
        "1 cell/bare",
        "12 cells/bare",
        "per cell ms",
        "cell median ms",
        "12 cells 2vCPU",
        "per cell 2vCPU ms"
    );
    for k in kernels {
        let mut series: Vec<Series> = backends.iter().map(|_| Series::default()).collect();
        for q in &backends {
            once(q, &k, 1, 1).await; // warm the cache and this QEMU's first start
        }
        for _ in 0..runs {
            for (q, s) in backends.iter().zip(series.iter_mut()) {
                s.sample(q, &k).await;
            }
        }
        for (q, s) in backends.iter().zip(series) {
            s.print(&format!("{k}, {}", short_version(&q.version)));
        }
    }
}
