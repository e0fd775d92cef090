//! The engine data disk: an ext4 image holding a guest engine's `/var/lib/docker` with a set of
//! images already loaded, prepared once per image set by a preparation boot (`docker save` on
//! the host streamed into `docker load` in the guest, both through bollard) and then used
//! copy-on-write (`snapshot=on`) by every boot. Nothing is ever pulled: the guest's network is
//! restricted to the forwarded API port.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::disks::{self, engine_dir, lock};
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
    let rootfs = disks::engine_rootfs_image()?;
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
    let _l = lock(&out)?;
    if let Some(i) = read_info(&out, &info_path) {
        return Ok((out, i));
    }
    // Under the lock nobody else prepares this disk: partial ones are from killed runs.
    let stem = format!("data-{key}.partial");
    if let Ok(rd) = std::fs::read_dir(engine_dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&stem) {
                std::fs::remove_file(e.path()).ok();
            }
        }
    }
    let partial = out.with_extension(format!("partial{}", std::process::id()));
    disks::mkfs_empty(&partial, DATA_DISK_BYTES, "nsm-engine-data")?;
    let t0 = Instant::now();
    let result = prepare(host, kernel, &partial, &resolved).await;
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
        prepared_on_kernel: kernel.to_string(),
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
    let refs: Vec<&str> = images.iter().map(|(r, _)| r.as_str()).collect();
    let saved = host.export_images(&refs);
    // `docker load` under TCG takes minutes (bollard's per-request timeout covers the whole
    // streamed request).
    let loader = engine
        .docker
        .clone()
        .with_timeout(Duration::from_secs(3600));
    let mut load = loader.import_image_stream(
        bollard::query_parameters::ImportImageOptionsBuilder::default()
            .quiet(true)
            .build(),
        saved,
        None,
    );
    let mut err = None;
    while let Some(item) = load.next().await {
        if let Err(e) = item {
            err = Some(anyhow!("docker load in the guest failed: {e}"));
            break;
        }
    }
    if err.is_none() {
        for r in &refs {
            if let Err(e) = engine.docker.inspect_image(r).await {
                err = Some(anyhow!("{r} is missing in the guest after loading: {e}"));
                break;
            }
        }
    }
    let load_s = t.elapsed().as_secs_f64();
    if let Some(e) = err {
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
