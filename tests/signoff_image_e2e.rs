//! `nsmatrix signoff-image` on the demo pair in vm-images/docker/ (an agent image before and
//! after `chmod u+s /usr/bin/bwrap`), through the real binary, real Docker and the engine guest
//! of the Synology-like kernel: the README's example, as written. The images are built from
//! their Dockerfiles once and found by content hash afterwards, so a rerun is fast.
//!
//! Needs root, Docker and QEMU; skips loudly without them, fails under CI (see tests/common).

mod common;

use common::*;

#[test]
fn the_demo_pair_signs_off_with_the_images_own_codex_observed() {
    if !require(is_root(), "root (setuid copies, containers)")
        || !require(docker_answers(), "a Docker engine")
        || !require(
            std::path::Path::new("/usr/bin/qemu-system-x86_64").exists(),
            "qemu-system-x86_64",
        )
    {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("signoff");
    let o = std::process::Command::new(bin())
        .args([
            "signoff-image",
            "vm-images/docker/agent-1.1.5.Dockerfile",
            "vm-images/docker/agent-1.1.6.Dockerfile",
            "--quiet",
            "--out",
        ])
        .arg(&out_dir)
        .current_dir(repo())
        .output()
        .expect("nsmatrix runs");
    let all = text(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);

    // The verdict is printed, and the exit code is signoff's for it.
    assert!(
        out_dir.join("signoff.json").is_file(),
        "no signoff.json ({}):\n{all}",
        o.status
    );
    let json = read_json(&out_dir.join("signoff.json"));
    let verdict = json["verdict"].as_str().unwrap().to_string();
    let want_code = match verdict.as_str() {
        "ship" => 0,
        "do-not-ship" => 1,
        other => panic!("no verdict ({other}):\n{all}"),
    };
    assert_eq!(o.status.code(), Some(want_code), "{all}");
    let line = json["verdict-line"].as_str().unwrap();
    assert!(stdout.contains(line), "verdict line not printed:\n{stdout}");
    // The README shows the verdict this example prints, word for word.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let shown = readme
        .lines()
        .find(|l| l.starts_with("**SHIP image=new") || l.starts_with("**DO NOT SHIP image=new"))
        .expect("README.md shows the sign-off example's verdict line");
    assert_eq!(
        shown,
        format!("**{line}**"),
        "README.md shows another verdict than this run printed:\n{stdout}"
    );
    assert_eq!(json["lost-coverage"].as_array().unwrap().len(), 0, "{json}");

    // Reports land as for `run`.
    for f in [
        "results.json",
        "junit.xml",
        "report.md",
        "signoff.md",
        "signoff-matrix.toml",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing in {out_dir:?}");
    }
    let results = read_json(&out_dir.join("results.json"));
    let cells = results["cells"].as_array().unwrap();
    let of = |image: &str, subject: &str| -> Vec<&serde_json::Value> {
        cells
            .iter()
            .filter(|c| c["axes"]["image"] == image && c["axes"]["subject"] == subject)
            .collect()
    };
    // The image's own bwrap: Debian's 0.8.0, setuid only in the new image.
    for (image, suid) in [("old", "false"), ("new", "true")] {
        let b = of(image, "bwrap");
        assert!(!b.is_empty());
        for c in &b {
            assert_eq!(c["details"]["bwrap.path"], "/usr/bin/bwrap", "{c}");
            assert_eq!(c["details"]["bwrap.setuid-bit"], suid, "{c}");
            assert!(
                c["details"]["bwrap.version"]
                    .as_str()
                    .unwrap()
                    .contains("0.8.0")
            );
        }
    }
    // The image's own Codex ran, from its npm installation, and a passing cell saw the bwrap
    // it used around the command.
    for image in ["old", "new"] {
        let ic = of(image, "image-codex");
        assert!(!ic.is_empty(), "no image-codex cell for {image}");
        for c in &ic {
            let path = c["details"]["codex.path"].as_str().unwrap_or("");
            assert!(path.ends_with("/codex"), "{c}");
            assert_eq!(c["details"]["codex.version"], "0.171.0", "{c}");
            assert!(
                c["details"]["codex.source"]
                    .as_str()
                    .unwrap()
                    .contains("image's own"),
                "{c}"
            );
        }
        let passed: Vec<_> = ic.iter().filter(|c| c["observed"] == "pass").collect();
        assert!(
            !passed.is_empty(),
            "the image's Codex never passed in {image}"
        );
        for c in passed {
            let used = c["details"]["codex.bwrap"].as_str().unwrap();
            assert!(used.contains("bwrap"), "{c}");
            assert!(
                c["evidence"]["sandbox"].as_str().unwrap().contains("bwrap"),
                "{c}"
            );
        }
    }
    // The pinned Codex is there as a reference, in both images, on the guest's kernel too.
    assert!(
        cells
            .iter()
            .any(|c| c["subject"] == "codex-0.171.0" && c["backend"] == "guest-docker")
    );
    let md = std::fs::read_to_string(out_dir.join("signoff.md")).unwrap();
    assert!(md.contains("## Subjects found in the images"), "{md}");
}

/// An image without Codex or bwrap (busybox only, imported from a tarball: no registry) is
/// signed off with those subjects reported missing, never dropped; the agent is static, so a
/// shell-less image needs nothing from the image.
#[test]
fn missing_subjects_are_reported_missing() {
    if !require(is_root(), "root") || !require(docker_answers(), "a Docker engine") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // A root filesystem with nothing but one static file: no shell, no bwrap, no Codex.
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0::/:/nonexistent\n").unwrap();
    let tar = t.path().join("root.tar");
    assert!(
        std::process::Command::new("tar")
            .args([
                "-C",
                root.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                "."
            ])
            .status()
            .unwrap()
            .success()
    );
    let tag = "nsmatrix-test/signoff-empty:1";
    assert!(
        std::process::Command::new("docker")
            .args(["import", tar.to_str().unwrap(), tag])
            .output()
            .unwrap()
            .status
            .success()
    );
    let deploy = t.path().join("d.toml");
    std::fs::write(
        &deploy,
        "[profile.default]\nseccomp = \"default\"\n\n[[environment]]\nname = \"docker\"\nbackend = \"docker\"\nprofile = \"default\"\nuid = \"image\"\n",
    )
    .unwrap();
    let out_dir = t.path().join("out");
    let o = std::process::Command::new(bin())
        .args(["signoff-image", tag, tag, "--quiet", "--deployments"])
        .arg(&deploy)
        .arg("--out")
        .arg(&out_dir)
        .current_dir(repo())
        .output()
        .unwrap();
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", tag])
        .output();
    let all = text(&o);
    let results = read_json(&out_dir.join("results.json"));
    let cells = results["cells"].as_array().unwrap();
    let observed = |subject: &str| -> Vec<String> {
        cells
            .iter()
            .filter(|c| c["axes"]["subject"] == subject)
            .map(|c| c["observed"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(!observed("bwrap").is_empty(), "{all}");
    assert!(
        observed("bwrap").iter().all(|s| s == "bwrap-missing"),
        "{all}"
    );
    assert!(
        observed("image-codex").iter().all(|s| s == "codex-missing"),
        "{all}"
    );
    assert!(!observed("image-codex").is_empty());
    // The same image on both sides: nothing fixed, nothing broken, still failing with remedies.
    assert_eq!(o.status.code(), Some(0), "{all}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("**missing** (`codex-missing`"), "{stdout}");
    assert!(stdout.contains("`codex-missing`"), "{stdout}");
    assert!(stdout.contains("install Codex in the image"), "{stdout}");
}
