//! `nsmatrix doctor`: what this host offers, each fact read, not assumed.

use std::path::Path;
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
    add(
        "host backend",
        match crate::backend::host::HostBackend::probe() {
            Ok(()) => "available".into(),
            Err(u) => format!("unavailable: {u}"),
        },
    );
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
    let docker_sock =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let sock_path = docker_sock.strip_prefix("unix://").unwrap_or(&docker_sock);
    add(
        "docker",
        if Path::new(sock_path).exists() {
            format!("socket {docker_sock} present")
        } else {
            format!("no engine at {docker_sock} (fix: start dockerd, or set DOCKER_HOST)")
        },
    );
    add(
        "qemu",
        match Command::new("qemu-system-x86_64").arg("--version").output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("?")
                .to_string(),
            Err(_) => "missing (fix: apt-get install qemu-system-x86)".into(),
        },
    );
    add(
        "/dev/kvm",
        if Path::new("/dev/kvm").exists() {
            "present (whether guests really run under KVM is probed by the qemu backend)".into()
        } else {
            "absent: guests run under TCG".into()
        },
    );
    add(
        "cache",
        crate::artifacts::cache::cache_dir().display().to_string(),
    );
    rows
}
