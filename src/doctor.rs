//! `nsmatrix doctor`: what this host offers, each fact read, not assumed.

use std::process::Command;

/// (fact, value) rows in display order.
pub fn report() -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: String| rows.push((k.to_string(), v));
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    add(
        "kernel",
        read("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "?".into()),
    );
    for (k, p) in [
        (
            "user.max_user_namespaces",
            "/proc/sys/user/max_user_namespaces",
        ),
        (
            "kernel.unprivileged_userns_clone",
            "/proc/sys/kernel/unprivileged_userns_clone",
        ),
        (
            "kernel.apparmor_restrict_unprivileged_userns",
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        ),
    ] {
        add(k, read(p).unwrap_or_else(|_| "absent".into()));
    }
    add("running as", format!("euid {}", unsafe { libc::geteuid() }));
    match crate::sandbox::subject::resolve_build("system") {
        Ok(p) => {
            let version = Command::new(&p)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|e| format!("fails to run: {e}"));
            let meta = std::fs::metadata(&p);
            let setuid = meta
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.mode() & 0o4000 != 0 && m.uid() == 0
                })
                .unwrap_or(false);
            add(
                "bwrap",
                format!("{} ({version}; setuid: {setuid})", p.display()),
            );
        }
        Err(e) => add(
            "bwrap",
            format!("missing: {e} (fix: apt-get install bubblewrap)"),
        ),
    }
    // Each backend's own probe: the qemu backend boots a real cached kernel under KVM with a
    // timeout (guests can hang here where a boot sector does not) and caches the answer.
    match crate::run::runtime() {
        Some(rt) => {
            let registry = rt.block_on(crate::backend::Registry::probe(
                &crate::backend::KINDS,
                &Default::default(),
            ));
            for kind in crate::backend::KINDS {
                match registry.get(kind) {
                    Ok(b) => {
                        for (k, v) in b.describe() {
                            add(&k, v);
                        }
                    }
                    Err(u) => add(
                        &format!("{} backend", kind.as_str()),
                        format!("unavailable: {u}"),
                    ),
                }
            }
        }
        None => add("backends", "not probed: no runtime".into()),
    }
    add(
        "engine guests",
        crate::backend::guest_docker::engine::disks::doctor_line(),
    );
    add(
        "cache",
        crate::artifacts::cache::cache_dir().display().to_string(),
    );
    rows
}
