//! The engine data disk: an ext4 image holding a guest engine's `/var/lib/docker` with a set of
//! images already loaded, prepared once per image set and then used copy-on-write
//! (`snapshot=on`) by every boot. Where this machine's dockerd is the guest engine's own build,
//! a private dockerd of this machine loads the images (`docker save` on the host's engine
//! streamed into `docker load`, both through bollard) into a directory that `mkfs.ext4 -d`
//! makes the disk: seconds, where a preparation boot under TCG takes minutes per GB. Else a
//! preparation boot of the guest does the same `docker load` in the guest. Nothing is ever pulled: the guest's network is
//! restricted to the forwarded API port.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::disks::{self, engine_dir, lock_async};
use super::{EngineOptions, start_guest_engine};

/// Bump when the way a data disk is prepared changes.
const DATA_RECIPE: &str = "engine-data v1";
/// The data disk's size (sparse: only what the images use takes space).
const DATA_DISK_BYTES: u64 = 8 << 30;

/// What a prepared data disk holds and what preparing it cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DataDiskInfo {
    /// Image reference → image id (the host engine's).
    pub images: Vec<(String, String)>,
    pub engine_rootfs: String,
    pub prepared_on_kernel: String,
    pub boot_s: f64,
    pub load_s: f64,
    pub total_s: f64,
}

/// The data disk for `images` (references in the host engine), prepared with a boot of
/// `kernel` when not cached. Returns its path and what it holds.
pub async fn ensure_data_disk(
    host: &Docker,
    kernel: &str,
    images: &[String],
) -> Result<(PathBuf, DataDiskInfo)> {
    if images.is_empty() {
        bail!("a data disk needs at least one image");
    }
    let mut resolved = Vec::new();
    for r in images {
        let i = host.inspect_image(r).await.with_context(|| {
            format!(
                "image {r:?} is not in the host's engine (build it first: nsmatrix images build)"
            )
        })?;
        resolved.push((r.clone(), i.id.unwrap_or_default()));
    }
    resolved.sort();
    resolved.dedup();
    // Building the engine's root file system takes minutes the first time: not on a worker.
    let rootfs = tokio::task::spawn_blocking(disks::engine_rootfs_image)
        .await
        .context("the root file system's build panicked")??;
    let rootfs_name = rootfs
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut h = Sha256::new();
    h.update(DATA_RECIPE);
    h.update(&rootfs_name);
    for (r, id) in &resolved {
        h.update(format!("\0{r}\0{id}"));
    }
    let key = &hex::encode(h.finalize())[..16];
    let out = engine_dir().join(format!("data-{key}.ext4"));
    let info_path = out.with_extension("json");
    if let Some(i) = read_info(&out, &info_path) {
        return Ok((out, i));
    }
    let _l = lock_async(&out).await?;
    if let Some(i) = read_info(&out, &info_path) {
        return Ok((out, i));
    }
    // Under the lock nobody else prepares this disk: partial ones are from killed runs.
    // (A partial disk, or the directory a native preparation loads into.)
    let (stem, prep) = (format!("data-{key}.partial"), format!("data-{key}.prep"));
    if let Ok(rd) = std::fs::read_dir(engine_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&stem) {
                std::fs::remove_file(e.path()).ok();
            } else if name.starts_with(&prep) {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
    }
    let partial = out.with_extension(format!("partial{}", std::process::id()));
    let t0 = Instant::now();
    // Natively where this machine's dockerd is the guest engine's own build (the same store
    // format); else in a guest under TCG, which takes minutes per GB.
    let same = {
        let rootfs = rootfs.clone();
        tokio::task::spawn_blocking(move || same_engine_on_host(&rootfs))
            .await
            .context("the engine version check panicked")?
    };
    let result = match same {
        Ok(version) => {
            eprintln!(
                "nsmatrix: preparing the engine data disk for {} image(s) with this machine's dockerd {version} (the guest engine's own version)",
                resolved.len()
            );
            prepare_on_host(host, &partial, &resolved).await
        }
        Err(why) => {
            eprintln!(
                "nsmatrix: preparing the engine data disk for {} image(s) in a guest of {kernel} (under TCG this takes minutes per GB): {why}",
                resolved.len()
            );
            match disks::mkfs_empty(&partial, DATA_DISK_BYTES, "nsm-engine-data") {
                Ok(()) => prepare(host, kernel, &partial, &resolved).await,
                Err(e) => Err(e),
            }
        }
    };
    let (boot_s, load_s) = match result {
        Ok(t) => t,
        Err(e) => {
            std::fs::remove_file(&partial).ok();
            return Err(e);
        }
    };
    let info = DataDiskInfo {
        images: resolved,
        engine_rootfs: rootfs_name,
        prepared_on_kernel: if boot_s == 0.0 {
            "this machine's dockerd".to_string()
        } else {
            kernel.to_string()
        },
        boot_s,
        load_s,
        total_s: t0.elapsed().as_secs_f64(),
    };
    std::fs::rename(&partial, &out)?;
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info)?)?;
    Ok((out, info))
}

fn read_info(out: &Path, info: &Path) -> Option<DataDiskInfo> {
    if !out.exists() {
        return None;
    }
    serde_json::from_slice(&std::fs::read(info).ok()?).ok()
}

/// This machine's dockerd version when it is the build the guest engine runs (same Debian
/// package version, so the same image store), and we may start one (root); else why not.
fn same_engine_on_host(rootfs: &Path) -> Result<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("not root, so no dockerd of our own");
    }
    let o = Command::new("dockerd")
        .arg("--version")
        .output()
        .context("no dockerd on this machine")?;
    // `Docker version 20.10.24+dfsg1, build 5d6db84`
    let host = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(2)
        .map(|v| v.trim_end_matches(',').to_string())
        .ok_or_else(|| anyhow!("dockerd --version said nothing"))?;
    let status = Command::new("debugfs")
        .args(["-R", "cat /var/lib/dpkg/status"])
        .arg(rootfs)
        .stderr(Stdio::null())
        .output()
        .context("failed to run debugfs (e2fsprogs)")?;
    let guest = guest_package_version(&String::from_utf8_lossy(&status.stdout), "docker.io")
        .ok_or_else(|| anyhow!("the engine's root file system has no docker.io package"))?;
    // The Debian revision (`-1+deb12u1`) is packaging; the upstream version is the engine.
    let upstream = guest.rsplit_once('-').map_or(guest.as_str(), |(u, _)| u);
    if upstream != host {
        bail!("this machine's dockerd is {host}, the guest's {upstream}");
    }
    Ok(host)
}

/// `Version:` of `package` in a dpkg status file.
fn guest_package_version(status: &str, package: &str) -> Option<String> {
    status
        .split("\n\n")
        .find(|p| p.lines().any(|l| l == format!("Package: {package}")))?
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_string)
}

/// A dockerd of this machine's, private to the preparation (its own data root, exec root,
/// socket, containerd namespace, an empty configuration and its own network namespace), loads
/// the images into a directory that `mkfs.ext4 -d` then makes the disk: the layers the guest's
/// engine would have unpacked, at native speed. Returns (0, load seconds).
async fn prepare_on_host(
    host: &Docker,
    disk: &Path,
    images: &[(String, String)],
) -> Result<(f64, f64)> {
    let dir = disk.with_extension(format!("prep{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(dir.join("exec"))?;
    let config = dir.join("daemon.json");
    std::fs::write(&config, "{}")?;
    let sock = dir.join("docker.sock");
    let log = std::fs::File::create(dir.join("dockerd.log"))?;
    let t = Instant::now();
    let mut cmd = tokio::process::Command::new("dockerd");
    cmd.arg("--config-file")
        .arg(&config)
        .arg("--data-root")
        .arg(&root)
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .arg("-H")
        .arg(format!("unix://{}", sock.display()))
        .args([
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--storage-driver=overlay2",
            "--containerd-namespace=nsmatrix-prep",
            "--containerd-plugins-namespace=nsmatrix-prep-plugins",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    // Its own network namespace: a dockerd started with `--bridge=none` deletes a `docker0`
    // it finds, and in this machine's namespace that is the running engine's default bridge
    // (its containers could no longer start until it restarts). Loading images needs no
    // network; the socket is a path, reachable from here. It ends with nsmatrix, even when
    // nsmatrix is killed (SIGTERM when the thread that started it, a runtime worker, ends).
    // SAFETY: unshare(2) and prctl(2) only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut dockerd = cmd.spawn().context("failed to start dockerd")?;
    let result = async {
        let engine = loop {
            if let Some(st) = dockerd.try_wait()? {
                bail!("dockerd exited ({st}) before it answered");
            }
            if sock.exists()
                && let Ok(d) = Docker::connect_with_unix(
                    &sock.to_string_lossy(),
                    3600,
                    bollard::API_DEFAULT_VERSION,
                )
                && d.ping().await.is_ok()
            {
                break d;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("dockerd did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        load_images(host, &engine, images).await
    }
    .await;
    if let Some(pid) = dockerd.id() {
        // SAFETY: kill(2) of the child we started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let stopped = tokio::time::timeout(Duration::from_secs(60), dockerd.wait()).await;
    if stopped.is_err() {
        let _ = dockerd.kill().await;
    }
    let load_s = t.elapsed().as_secs_f64();
    let result = result.and_then(|()| {
        // The engine's state directories, which a booted engine makes on its own.
        for d in ["containers", "tmp", "runtimes", "network", "buildkit"] {
            let _ = std::fs::remove_dir_all(root.join(d));
        }
        disks::mkfs_from_dir(&root, disk, DATA_DISK_BYTES, "nsm-engine-data")
    });
    let log_tail = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
    std::fs::remove_dir_all(&dir).ok();
    result.with_context(|| {
        let tail: Vec<&str> = log_tail.lines().rev().take(10).collect();
        format!(
            "preparing the data disk with this machine's dockerd failed; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    Ok((0.0, load_s))
}

/// `docker save` on `from` streamed into `docker load` on `into`; every image must be there.
async fn load_images(from: &Docker, into: &Docker, images: &[(String, String)]) -> Result<()> {
    let refs: Vec<&str> = images.iter().map(|(r, _)| r.as_str()).collect();
    let saved = from.export_images(&refs);
    // `docker load` under TCG takes minutes (bollard's per-request timeout covers the whole
    // streamed request).
    let loader = into.clone().with_timeout(Duration::from_secs(3600));
    let mut load = loader.import_image_stream(
        bollard::query_parameters::ImportImageOptionsBuilder::default()
            .quiet(true)
            .build(),
        saved,
        None,
    );
    while let Some(item) = load.next().await {
        if let Err(e) = item {
            bail!("docker load failed: {e}");
        }
    }
    for r in &refs {
        if let Err(e) = into.inspect_image(r).await {
            bail!("{r} is missing after loading: {e}");
        }
    }
    Ok(())
}

/// Boot with the empty disk writable, stream the images in, stop dockerd cleanly.
async fn prepare(
    host: &Docker,
    kernel: &str,
    disk: &Path,
    images: &[(String, String)],
) -> Result<(f64, f64)> {
    let mut opts = EngineOptions::new(kernel);
    opts.data_disk = Some(disk.to_path_buf());
    opts.data_disk_writable = true;
    let engine = start_guest_engine(&opts).await?;
    let boot_s = engine.timings.ready.as_secs_f64();
    let t = Instant::now();
    let loaded = load_images(host, &engine.docker, images)
        .await
        .context("in the guest");
    let load_s = t.elapsed().as_secs_f64();
    if let Err(e) = loaded {
        let _ = engine.shutdown().await;
        return Err(e);
    }
    engine.stop(Duration::from_secs(120)).await?;
    Ok((boot_s, load_s))
}

/// The integration's entry point: `images` (references in the host's engine, e.g. the tags
/// `nsmatrix images build` makes) in a guest engine of `opts.kernel`, through the cached data
/// disk (prepared first if needed). Returns the running engine and what its data disk holds.
pub async fn start_with_images(
    mut opts: EngineOptions,
    images: &[String],
) -> Result<(super::GuestEngine, DataDiskInfo)> {
    let host = Docker::connect_with_defaults()
        .context("no Docker client for the host's engine (the images come from it)")?;
    let (disk, info) = ensure_data_disk(&host, &opts.kernel, images).await?;
    opts.data_disk = Some(disk);
    opts.data_disk_writable = false;
    Ok((start_guest_engine(&opts).await?, info))
}

#[cfg(test)]
mod tests {
    use super::guest_package_version;

    #[test]
    fn the_engine_version_is_read_from_the_package_s_own_stanza() {
        let status = "Package: containerd\nStatus: install ok installed\nVersion: 1.6.20~ds1-1+deb12u3\n\nPackage: docker.io\nStatus: install ok installed\nVersion: 20.10.24+dfsg1-1+deb12u1+b6\nDepends: adduser\n\nPackage: docker.io-doc\nVersion: 9\n";
        assert_eq!(
            guest_package_version(status, "docker.io").as_deref(),
            Some("20.10.24+dfsg1-1+deb12u1+b6")
        );
        assert_eq!(guest_package_version(status, "runc"), None);
    }
}
