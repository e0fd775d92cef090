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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    add(
        "docker",
        match rt
            .as_ref()
            .map(|rt| rt.block_on(crate::backend::docker::connect()))
        {
            Ok(Ok(d)) => {
                let e = d.engine();
                format!(
                    "engine {} (API {}) at {}",
                    e.version, e.api_version, e.endpoint
                )
            }
            Ok(Err(u)) => format!("unavailable: {u}"),
            Err(e) => format!("not probed: {e}"),
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
            "present".into()
        } else {
            "absent: guests run under TCG".into()
        },
    );
    // The qemu backend boots a real cached kernel under KVM with a timeout (guests can hang
    // here where a boot sector does not) and caches the answer per host.
    let accel = rt
        .as_ref()
        .map(|rt| rt.block_on(crate::backend::qemu::QemuBackend::probe()));
    add(
        "qemu acceleration",
        match accel {
            Ok(Ok(q)) => q.accel_note.clone(),
            Ok(Err(u)) => format!("unavailable: {u}"),
            Err(e) => format!("not probed: {e}"),
        },
    );
    add("engine guests", crate::guest_engine::disks::doctor_line());
    add(
        "cache",
        crate::artifacts::cache::cache_dir().display().to_string(),
    );
    rows
}
