//! Bounded property tests over the parser and the CLI: any input, no panic; malformed
//! patches get one of Codex's messages and exit code 1.

use std::ffi::OsString;

use nsmatrix::apply_patch::{parse, run_cli};
use proptest::prelude::*;

/// Lines that look like the grammar, so random inputs reach deep into the parser.
fn patchy() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("*** Begin Patch".to_string()),
        Just("*** End Patch".to_string()),
        Just("*** Add File: a.txt".to_string()),
        Just("*** Delete File: a.txt".to_string()),
        Just("*** Update File: a.txt".to_string()),
        Just("*** Move to: b.txt".to_string()),
        Just("*** End of File".to_string()),
        Just("@@".to_string()),
        Just("<<'EOF'".to_string()),
        Just("EOF".to_string()),
        "[ +\\-@*]{0,3}[a-z é\t\r]{0,6}",
        any::<String>(),
    ];
    prop::collection::vec(line, 0..12).prop_map(|ls| ls.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(text in patchy()) {
        let _ = parse(&text);
    }

    #[test]
    fn parse_never_panics_on_any_string(text in any::<String>()) {
        let _ = parse(&text);
    }

    #[test]
    fn malformed_patches_fail_with_codex_messages(text in patchy()) {
        if let Err(e) = parse(&text) {
            let dir = tempfile::tempdir().unwrap();
            let _cwd = CwdGuard::enter(dir.path());
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = run_cli(&[OsString::from(&text)], &mut std::io::empty(), &mut out, &mut err);
            prop_assert_eq!(code, 1);
            prop_assert!(out.is_empty());
            let err = String::from_utf8(err).unwrap();
            prop_assert_eq!(err.trim_end(), e.to_string());
            prop_assert!(err.starts_with("Invalid patch: ") || err.starts_with("Invalid patch hunk on line "));
        }
    }
}

/// run_cli applies under the current directory; tests in this file run it one at a time.
struct CwdGuard(
    std::path::PathBuf,
    #[allow(dead_code)] std::sync::MutexGuard<'static, ()>,
);

impl CwdGuard {
    fn enter(dir: &std::path::Path) -> CwdGuard {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let old = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir).unwrap();
        CwdGuard(old, g)
    }
}

impl Drop for CwdGuard {
    fn drop(&mut self) {
        std::env::set_current_dir(&self.0).ok();
    }
}

#[test]
fn usage_errors_match_codex() {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_cli(&[], &mut std::io::empty(), &mut out, &mut err);
    assert_eq!(code, 2);
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "Usage: apply_patch 'PATCH'\n       echo 'PATCH' | apply_patch\n"
    );
    let mut err = Vec::new();
    let code = run_cli(
        &["a".into(), "b".into()],
        &mut std::io::empty(),
        &mut out,
        &mut err,
    );
    assert_eq!(code, 2);
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "Error: apply_patch accepts exactly one argument.\n"
    );
    let mut err = Vec::new();
    let code = run_cli(&[], &mut &b"\xff"[..], &mut out, &mut err);
    assert_eq!(code, 1);
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "Error: Failed to read PATCH from stdin.\nstream did not contain valid UTF-8\n"
    );
    assert!(out.is_empty());
}
