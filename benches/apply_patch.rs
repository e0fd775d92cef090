//! Benchmark: the large-file scenario (1 MB, 200 chunks) applied by our `apply_patch` and by
//! Codex's, each as a process (start-up included), in fresh copies; prints medians and ratio.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nsmatrix::scenario::load;

const RUNS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(bin: &Path, s: &nsmatrix::scenario::Scenario) -> Duration {
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        s.materialise(dir.path()).unwrap();
        let patch = String::from_utf8(s.patch_bytes().unwrap()).unwrap();
        let t = Instant::now();
        let st = Command::new(bin)
            .arg(&patch)
            .current_dir(dir.path())
            .output()
            .unwrap();
        times.push(t.elapsed());
        assert_eq!(
            st.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        s.check_tree(dir.path()).unwrap();
    }
    median(times)
}

fn link(dir: &Path, target: &Path) -> std::path::PathBuf {
    let p = dir.join("apply_patch");
    std::os::unix::fs::symlink(target, &p).unwrap();
    p
}

fn main() {
    let s = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/large_file_200_hunks"))
        .unwrap();
    let ours_dir = tempfile::tempdir().unwrap();
    let ours = time(
        &link(ours_dir.path(), Path::new(env!("CARGO_BIN_EXE_nsmatrix"))),
        &s,
    );
    println!("nsmatrix apply_patch: median {ours:?} over {RUNS} runs");
    match nsmatrix::artifacts::npm::codex_package("0.171.0") {
        Ok(pkg) => {
            let codex_dir = tempfile::tempdir().unwrap();
            let codex = time(&link(codex_dir.path(), &pkg.codex), &s);
            println!("codex 0.171.0 apply_patch: median {codex:?} over {RUNS} runs");
            println!(
                "ratio nsmatrix/codex: {:.2} (below 1 is faster than Codex)",
                ours.as_secs_f64() / codex.as_secs_f64()
            );
        }
        Err(e) => println!("codex not available, no ratio: {e:#}"),
    }
}
