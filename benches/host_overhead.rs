//! The harness's own overhead per cell, against a plain shell loop that runs the same bwrap +
//! apply_patch commands (lay out the workspace, run the sandbox as uid 1000, compare the tree).
//!
//! `cargo bench --bench host_overhead` (as root, bwrap installed). Prints the medians of
//! several rounds and their ratio; the README quotes the figures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;

fn main() {
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/bwrap").exists() {
        eprintln!("host_overhead: needs root and /usr/bin/bwrap; skipped");
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nsmatrix"));
    // Scenarios whose outcome the shell can check with diff -r, as the harness does: the patch
    // applies (exit 0), nothing leaves the workspace, and there is an expected/ tree.
    let scenarios: Vec<PathBuf> = nsmatrix::scenario::load_set(&repo.join("scenarios"))
        .expect("scenarios/ loads")
        .into_iter()
        .filter(|s| {
            s.meta.exit_code == 0 && s.meta.confinement.is_none() && s.dir.join("expected").is_dir()
        })
        .map(|s| s.dir)
        .collect();
    assert!(!scenarios.is_empty(), "no scenario to measure");
    let tmp = tempfile::Builder::new()
        .prefix("nsmatrix-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let matrix = tmp.path().join("m.toml");
    let list = scenarios
        .iter()
        .map(|p| format!("{:?}", p.file_name().unwrap().to_string_lossy()))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &matrix,
        format!(
            "[settings]\nhost-work-dir = \"{}\"\n[[environment]]\nname = \"host\"\nbackend = \"host\"\n[[subject]]\nname = \"bwrap\"\nkind = \"bwrap\"\nsetuid = false\n[[scenarios]]\nname = \"bench\"\ndir = \"{}\"\nonly = [{list}]\n",
            tmp.path().join("hw").display(),
            repo.join("scenarios").display()
        ),
    )
    .unwrap();
    // The shell loop: the same steps, as directly as a person would write them.
    let script = tmp.path().join("loop.sh");
    std::fs::write(
        &script,
        r#"set -u
bin="$1"; shift
w=$(mktemp -d /var/tmp/nsmatrix-bench-shell.XXXXXX); chmod 711 "$w"
cp /usr/bin/bwrap "$w/bwrap"; ln -s "$bin" "$w/apply_patch"
for d in "$@"; do
  rm -rf "$w/c"; mkdir -p "$w/c/ws" "$w/c/outside"
  [ -d "$d/input" ] && cp -a "$d/input/." "$w/c/ws/"
  echo sentinel > "$w/c/outside/sentinel.txt"
  chown -R 1000:1000 "$w/c"
  setpriv --reuid 1000 --regid 1000 --clear-groups "$w/bwrap" --new-session --die-with-parent \
    --ro-bind / / --dev /dev --bind "$w/c/ws" "$w/c/ws" --unshare-user --unshare-pid --unshare-net \
    --proc /proc --chdir "$w/c/ws" -- "$w/apply_patch" "$(cat "$d/patch.txt")" >/dev/null 2>&1
  diff -r "$d/expected" "$w/c/ws" >/dev/null || echo "MISMATCH $d"
done
rm -rf "$w"
"#,
    )
    .unwrap();
    let mut harness = Vec::new();
    let mut shell = Vec::new();
    for _ in 0..ROUNDS {
        let out = tmp.path().join("out");
        let t = Instant::now();
        let o = Command::new(&bin)
            .args([
                "run",
                "--quiet",
                "--matrix",
                matrix.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--jobs",
                "1",
            ])
            .output()
            .unwrap();
        harness.push(t.elapsed());
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        let t = Instant::now();
        let o = Command::new("bash")
            .arg(&script)
            .arg(&bin)
            .args(&scenarios)
            .output()
            .unwrap();
        shell.push(t.elapsed());
        assert!(
            o.status.success() && o.stdout.is_empty(),
            "shell loop: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let (h, s) = (median(&mut harness), median(&mut shell));
    let n = scenarios.len() as f64;
    println!(
        "host_overhead: {} cells per round, {ROUNDS} rounds, medians:",
        scenarios.len()
    );
    println!(
        "  nsmatrix run (whole process, reports included): {:.1} ms = {:.2} ms/cell",
        ms(h),
        ms(h) / n
    );
    println!(
        "  shell loop of the same bwrap + apply_patch:      {:.1} ms = {:.2} ms/cell",
        ms(s),
        ms(s) / n
    );
    println!(
        "  ratio nsmatrix / shell: {:.2} (target <= 1.2)",
        ms(h) / ms(s)
    );
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
