//! Engine guests under TCG, per kernel, through the real binary (a guest's init is the
//! nsmatrix binary itself, so this bench drives `nsmatrix`, not the library): a bare boot (QEMU
//! start to power-off) against a boot to an engine that answers (`nsmatrix vm engine
//! --bare-boot --image bookworm`), then a container's start inside the guest (create to the
//! agent's hello) and a cell's marginal cost in a running container there: `nsmatrix run` of a
//! one-container guest-docker matrix with 1 and with 11 cells, from the batch's stage times in
//! `results.json`. Median of `NSMATRIX_BENCH_RUNS` (default 1) runs.
//! `cargo bench --bench guest_docker [-- KERNEL...]` (default synology-like-5.10), as root with
//! QEMU and a Docker engine on the host (the image is built there).

use std::path::Path;
use std::process::Command;

const NSMATRIX: &str = env!("CARGO_BIN_EXE_nsmatrix");

const SCENARIOS: [&str; 11] = [
    "add_empty_file",
    "add_file",
    "add_nested_dirs",
    "add_overwrites_existing",
    "confine_absolute_add",
    "confine_dotdot_add",
    "confine_move_out",
    "confine_symlink_dir_update",
    "confine_symlink_file_update",
    "crlf_patch",
    "delete_dangling_symlink_fails",
];

fn seconds_after(text: &str, mark: &str) -> f64 {
    let at = text
        .find(mark)
        .unwrap_or_else(|| panic!("no `{mark}` in:\n{text}"));
    text[at + mark.len()..]
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{mark}` in:\n{text}"))
}

/// (bare boot, engine ready) in seconds.
fn boots(kernel: &str) -> (f64, f64) {
    let o = Command::new(NSMATRIX)
        .args([
            "vm",
            "engine",
            "--kernel",
            kernel,
            "--bare-boot",
            "--image",
            "bookworm",
        ])
        .output()
        .unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "vm engine failed:\n{t}");
    (
        seconds_after(&t, "bare boot: "),
        seconds_after(&t, "engine ready "),
    )
}

/// (container start, run) in seconds of a one-container batch with `n` cells.
fn batch(dir: &Path, kernel: &str, n: usize) -> (f64, f64) {
    let only: Vec<String> = SCENARIOS[..n].iter().map(|s| format!("\"{s}\"")).collect();
    let m = dir.join(format!("m-{kernel}-{n}.toml"));
    std::fs::write(
        &m,
        format!(
            r#"[settings]
retries = 0

[profile.default]
seccomp = "default"

[image.bookworm]
recipe = "bookworm"

[[environment]]
name = "bench"
backend = "guest-docker"
kernel = "{kernel}"
image = "bookworm"
profile = "default"
uid = 1000

[[subject]]
name = "bwrap"
kind = "bwrap"
build = "system"
setuid = false
argv = "codex"

[[scenarios]]
name = "s"
dir = "{}/scenarios"
only = [{}]
"#,
            env!("CARGO_MANIFEST_DIR"),
            only.join(", ")
        ),
    )
    .unwrap();
    let out = dir.join(format!("out-{kernel}-{n}"));
    let o = Command::new(NSMATRIX)
        .args(["run", "-q", "--matrix"])
        .arg(&m)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("results.json")).unwrap_or_else(|e| {
            panic!(
                "no results ({e}):\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        }),
    )
    .unwrap();
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), n);
    assert!(
        cells.iter().all(|c| c["status"] != "ERROR"),
        "a cell ended in ERROR"
    );
    let st = &r["batches"][0]["stage-ms"];
    let ms = |k: &str| st[k].as_f64().unwrap_or(0.0) / 1000.0;
    (ms("start"), ms("run"))
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
    let dir = tempfile::tempdir().unwrap();
    for k in &kernels {
        let (mut bare, mut ready, mut start, mut marginal) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let (b, r) = boots(k);
            bare.push(b);
            ready.push(r);
            let (s1, r1) = batch(dir.path(), k, 1);
            let (s11, r11) = batch(dir.path(), k, 11);
            start.push((s1 + s11) / 2.0);
            marginal.push((r11 - r1) / 10.0);
        }
        let (bare, ready) = (median(bare), median(ready));
        println!(
            "{k}: bare boot {bare:.1} s; engine ready {ready:.1} s (ratio {:.1}, target <= 2); container start in the guest {:.1} s; marginal cell {:.0} ms (target <= 100 ms); {runs} run(s)",
            ready / bare,
            median(start),
            median(marginal) * 1000.0
        );
    }
}
