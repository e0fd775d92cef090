//! Our `apply_patch` against the real Codex CLI (npm `@openai/codex`, pinned): every scenario
//! of the corpus, then a few hundred generated patches, must give identical exit codes,
//! stdout, stderr and trees. The corpus test also checks both against the recorded
//! expectations, and a corpus-only test checks ours without the network.

mod apply_patch_common;

use apply_patch_common::*;
use nsmatrix::scenario::{Scenario, load_set};

fn check_expectations(engine: &str, s: &Scenario, o: &Outcome) {
    assert_eq!(
        o.exit,
        Some(s.meta.exit_code),
        "{engine}: {}: exit code; stderr: {}",
        s.name,
        o.stderr
    );
    if let Some(e) = &s.meta.stdout {
        assert!(
            e.matches(&o.stdout),
            "{engine}: {}: stdout {:?} does not meet {e:?}",
            s.name,
            o.stdout
        );
    }
    if let Some(e) = &s.meta.stderr {
        assert!(
            e.matches(&o.stderr),
            "{engine}: {}: stderr {:?} does not meet {e:?}",
            s.name,
            o.stderr
        );
    }
}

#[test]
fn corpus_passes_with_our_engine() {
    let ours = Engine::ours();
    let set = load_set(&scenarios_dir()).unwrap();
    assert!(set.len() >= 30, "corpus too small: {}", set.len());
    for s in &set {
        let o = run_scenario(&ours, s);
        check_expectations("nsmatrix", s, &o);
    }
}

#[test]
fn corpus_matches_codex() {
    let Some(codex) = codex_engine() else { return };
    let ours = Engine::ours();
    let set = load_set(&scenarios_dir()).unwrap();
    for s in &set {
        let want = run_scenario(&codex, s);
        check_expectations("codex", s, &want);
        let got = run_scenario(&ours, s);
        assert_eq!(
            got, want,
            "scenario {}: nsmatrix differs from codex",
            s.name
        );
    }
    eprintln!(
        "differential: {} scenarios identical in both engines",
        set.len()
    );
}

/// A small deterministic generator (xorshift64*), so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, pct: usize) -> bool {
        self.below(100) < pct
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const WORDS: &[&str] = &[
    "alpha",
    "beta",
    "gamma",
    "fn main() {",
    "}",
    "    x += 1;",
    "",
    "  ",
    "“q”",
    "a\u{2014}b",
    "x  ",
    "\tindent",
    "*** not a marker",
    "@@ odd",
    "-dash",
    "+plus",
];

fn random_file(r: &mut Rng) -> Vec<String> {
    (0..r.below(12))
        .map(|_| r.pick(WORDS).to_string())
        .collect()
}

fn render_file(r: &mut Rng, lines: &[String]) -> Vec<u8> {
    let crlf = r.chance(20);
    let mut s = String::new();
    for (i, l) in lines.iter().enumerate() {
        s.push_str(l);
        let last = i + 1 == lines.len();
        if !(last && r.chance(20)) {
            s.push_str(if crlf || r.chance(3) { "\r\n" } else { "\n" });
        }
    }
    s.into_bytes()
}

/// A patch over files f0..f2: mostly well-formed chunks taken from the files (so they apply,
/// exercising the apply rules), with mutations that exercise the parser and the errors.
fn random_patch(r: &mut Rng, files: &[Vec<String>]) -> String {
    // Half the patches are "clean" (no deliberate damage), so that many apply.
    let clean = r.chance(50);
    let dirty = |r: &mut Rng, pct: usize| !clean && r.chance(pct);
    let mut p = Vec::<String>::new();
    let begin = if dirty(r, 30) {
        *r.pick(&["  *** Begin Patch ", "*** Begin"])
    } else {
        "*** Begin Patch"
    };
    p.push(begin.into());
    for _ in 0..r.below(4) {
        let f = r.below(files.len() + usize::from(!clean));
        let name = format!("f{f}.txt");
        match if clean { 3 + r.below(7) } else { r.below(10) } {
            0 => {
                p.push(format!("*** Add File: {name}"));
                for _ in 0..r.below(3) {
                    p.push(format!("+{}", r.pick(WORDS)));
                }
            }
            1 => p.push(format!("*** Delete File: {name}")),
            2 => p.push(
                r.pick(&["*** Frob File: x", "garbage", "", "*** End of File"])
                    .to_string(),
            ),
            _ => {
                p.push(format!("*** Update File: {name}"));
                if dirty(r, 15) {
                    p.push(format!(
                        "*** Move to: {}",
                        r.pick(&["m.txt", "d/m.txt", "f0.txt", "m.txt  "])
                    ));
                }
                let lines: &[String] = files.get(f).map(|v| v.as_slice()).unwrap_or(&[]);
                let mut from = 0;
                for c in 0..1 + r.below(3) {
                    if c > 0 || r.chance(80) {
                        let ctx = if r.chance(25) && !lines.is_empty() {
                            format!("@@ {}", r.pick(lines))
                        } else if dirty(r, 25) {
                            "@@ nothere".to_string()
                        } else {
                            r.pick(&["@@", "@@ "]).to_string()
                        };
                        p.push(ctx);
                    }
                    let start = if clean {
                        (from + r.below(3)).min(lines.len())
                    } else if lines.is_empty() {
                        0
                    } else {
                        r.below(lines.len())
                    };
                    let len = r.below(4).min(lines.len() - start.min(lines.len()));
                    for l in &lines[start..start + len] {
                        match r.below(6) {
                            0 => p.push(format!(" {l}")),
                            1 => p.push(format!("-{}", l.trim_end())),
                            2 => p.push(if l.is_empty() {
                                String::new()
                            } else {
                                format!(" {l}")
                            }),
                            _ => p.push(format!("-{l}")),
                        }
                    }
                    from = start + len;
                    for _ in 0..r.below(3) {
                        p.push(format!("+{}", r.pick(WORDS)));
                    }
                    if dirty(r, 10) {
                        p.push(r.pick(&["-zzz", "bogus", "*** End of File"]).to_string());
                    }
                    if dirty(r, 15) || (clean && from == lines.len() && r.chance(30)) {
                        p.push("*** End of File".into());
                    }
                }
            }
        }
    }
    if !dirty(r, 10) {
        p.push(
            r.pick(&["*** End Patch", "*** End Patch", " *** End Patch  "])
                .to_string(),
        );
    }
    let mut text = p.join("\n");
    if r.chance(50) {
        text.push('\n');
    }
    if r.chance(5) {
        text = format!("<<'EOF'\n{text}\nEOF\n");
    }
    text
}

#[test]
fn generated_patches_match_codex() {
    let Some(codex) = codex_engine() else { return };
    let ours = Engine::ours();
    const CASES: u64 = 300;
    let (mut ok, mut failed) = (0, 0);
    for seed in 1..=CASES {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let files: Vec<Vec<String>> = (0..3).map(|_| random_file(&mut r)).collect();
        let bytes: Vec<Vec<u8>> = files.iter().map(|f| render_file(&mut r, f)).collect();
        let patch = random_patch(&mut r, &files);
        let run = |e: &Engine| {
            let cell = Cell::new();
            for (i, b) in bytes.iter().enumerate() {
                std::fs::write(cell.ws().join(format!("f{i}.txt")), b).unwrap();
            }
            run_patch(e, &cell, patch.as_bytes(), &[])
        };
        let want = run(&codex);
        let got = run(&ours);
        assert_eq!(
            got, want,
            "seed {seed}: nsmatrix differs from codex on patch:\n{patch}\nfiles: {bytes:?}"
        );
        if want.exit == Some(0) {
            ok += 1
        } else {
            failed += 1
        }
    }
    eprintln!("generative: {CASES} patches identical ({ok} applied, {failed} rejected)");
    // A generator whose patches all fail (or all pass) would test little.
    assert!(
        ok >= CASES / 10 && failed >= CASES / 10,
        "generator is unbalanced: {ok} ok, {failed} failed"
    );
}
