//! The Codex CLI package: fetched once per version from the npm registry, verified against the
//! registry's integrity hash, and fetched again when the cache is corrupted.

mod common;

use std::process::Command;

use common::*;

#[test]
fn codex_is_verified_cached_and_refetched_when_corrupted() {
    let cache = tempfile::Builder::new()
        .prefix("nsmatrix-codex-cache")
        .tempdir_in("/var/tmp")
        .unwrap();
    // SAFETY: this test binary has this one test; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("NSMATRIX_CACHE", cache.path()) };
    let version = "0.171.0";
    let pkg = match nsmatrix::artifacts::npm::codex_package(version) {
        Ok(p) => p,
        Err(e) => {
            require(false, &format!("the npm registry is reachable: {e:#}"));
            return;
        }
    };
    let run_version = |p: &std::path::Path| {
        let o = Command::new(p)
            .arg("--version")
            .output()
            .expect("codex runs");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(run_version(&pkg.codex), format!("codex-cli {version}"));
    let bwrap = pkg.bwrap.as_ref().expect("0.171.0 bundles a bwrap");
    assert!(bwrap.is_file(), "the bundled bwrap is unpacked beside it");
    assert_eq!(
        bwrap.parent().unwrap().file_name().unwrap(),
        "codex-resources"
    );

    // A second call uses the cache: the tarball is not written again.
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = mtime(&pkg.tarball);
    let again = nsmatrix::artifacts::npm::codex_package(version).unwrap();
    assert_eq!(mtime(&again.tarball), before);

    // Corrupt both the tarball and the unpacked binary: both are detected and replaced.
    let mut bytes = std::fs::read(&pkg.tarball).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&pkg.tarball, &bytes).unwrap();
    std::fs::write(&pkg.codex, b"#!/bin/sh\necho corrupted\n").unwrap();
    let fixed = nsmatrix::artifacts::npm::codex_package(version).unwrap();
    assert_eq!(run_version(&fixed.codex), format!("codex-cli {version}"));
    let bytes2 = std::fs::read(&fixed.tarball).unwrap();
    assert_ne!(
        bytes2[mid], bytes[mid],
        "the corrupted tarball was fetched again"
    );
}
