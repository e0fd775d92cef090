//! The QEMU part of the default matrix (`nsmatrix run --filter backend=qemu`) at `--jobs 1`
//! and `--jobs 2`, side by side (interleaved, median of `NSMATRIX_BENCH_RUNS`, default 1), from
//! each run's timeline in `results.json`: the part's wall time from its first batch's start to
//! its last one's end, their ratio (target ≤ 0.6), and the run's packing ratio: wall ÷ (the
//! batches' slot time ÷ jobs), target ≤ 1.15.
//! `cargo bench --bench qemu_part [-- MATRIX]`. Needs qemu and the default matrix's kernels.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

struct Part {
    wall_s: f64,
    run_s: f64,
    packing: f64,
    guests: usize,
}

fn run(bin: &PathBuf, matrix: &str, jobs: usize, out: &std::path::Path) -> Part {
    let st = Command::new(bin)
        .args([
            "run",
            "--quiet",
            "--matrix",
            matrix,
            "--filter",
            "backend=qemu",
        ])
        .args(["--jobs", &jobs.to_string(), "--out"])
        .arg(out)
        .status()
        .expect("nsmatrix runs");
    // Exit 1 (a FAIL) still times the part; an ERROR or worse would not be the same work.
    assert!(
        matches!(st.code(), Some(0 | 1)),
        "nsmatrix run --jobs {jobs} exited {st}"
    );
    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let r: Value = serde_json::from_str(&text).expect("results.json parses");
    let t = &r["timeline"];
    let ms = |v: &Value| v.as_u64().expect("a time in ms") as f64;
    let spans = t["spans"].as_array().expect("a run has a timeline");
    let wall = ms(&t["dispatch-end-ms"]) - ms(&t["dispatch-start-ms"]);
    let slot_time: f64 = spans
        .iter()
        .map(|s| {
            let lanes = s["lanes"].as_array().map_or(1, |l| l.len().max(1));
            (ms(&s["end-ms"]) - ms(&s["start-ms"])) * lanes as f64
        })
        .sum();
    Part {
        wall_s: wall / 1000.0,
        run_s: ms(&r["duration-ms"]) / 1000.0,
        packing: wall / (slot_time / ms(&t["jobs"])),
        guests: spans.len(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nsmatrix"));
    let matrix = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| repo.join("matrix.toml").to_string_lossy().into_owned());
    let runs: usize = std::env::var("NSMATRIX_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut one: Vec<Part> = Vec::new();
    let mut two: Vec<Part> = Vec::new();
    for k in 0..runs {
        one.push(run(&bin, &matrix, 1, &tmp.path().join(format!("j1-{k}"))));
        two.push(run(&bin, &matrix, 2, &tmp.path().join(format!("j2-{k}"))));
    }
    let m = |v: &[Part], f: fn(&Part) -> f64| median(v.iter().map(f).collect());
    println!(
        "QEMU part of {matrix}: {} guests, median of {runs} interleaved run(s)",
        one[0].guests
    );
    println!(
        "{:<8} {:>12} {:>10} {:>22}",
        "--jobs", "part wall s", "run s", "wall/(slot time/jobs)"
    );
    for (j, v) in [(1, &one), (2, &two)] {
        println!(
            "{j:<8} {:>12.1} {:>10.1} {:>22.2}",
            m(v, |p| p.wall_s),
            m(v, |p| p.run_s),
            m(v, |p| p.packing)
        );
    }
    println!(
        "jobs 2 / jobs 1 (target <= 0.6): {:.2}",
        m(&two, |p| p.wall_s) / m(&one, |p| p.wall_s)
    );
}
