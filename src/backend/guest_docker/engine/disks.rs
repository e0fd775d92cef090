//! The cached artifacts an engine guest boots from, all under `cache_dir()/engine/`, each built
//! once under a lock and moved into place when complete:
//! - the engine's root file system (`bookworm-engine`, Debian's docker.io, containerd and runc)
//!   as an ext4 image made with `mkfs.ext4 -d`;
//! - the modules a packaged kernel needs for disks, overlayfs and the network, kept next to the
//!   kernel in the kernel cache;
//! - the base initramfs: the stripped static nsmatrix binary (PID 1) and those modules;
//! - the Codex package as a read-only ext4 image;
//! - AppArmor's tools from the engine suite's `apparmor` package, as an initramfs part.
//!
//! The engine data disk, which needs a boot to prepare, is in `super::data`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::agent::init::{GUEST_AGENT, GUEST_MODULES_DIR, GUEST_MODULES_LIST};
use crate::artifacts::cache::cache_dir;
use crate::artifacts::debian::{Mirror, extract_deb};
use crate::artifacts::kernels::{self, Kernel};
use crate::artifacts::rootfs::{RootfsRecipe, ensure_rootfs};
use crate::protocol::engine::GUEST_APPARMOR_TOOLS;

/// The root file system recipe of the engine (`vm-images/rootfs/bookworm-engine.toml`).
pub const ENGINE_ROOTFS: &str = "bookworm-engine";
/// Modules a packaged kernel loads for an engine guest, dependencies found by modinfo. Those
/// built in are not found and simply skipped.
pub const ENGINE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "crc32c_generic",
    "ext4",
    "overlay",
];
/// Bump when the layout of an artifact below changes.
const RECIPE: &str = "engine-disks v1";

pub fn engine_dir() -> PathBuf {
    cache_dir().join("engine")
}

pub use crate::artifacts::cache::{Lock, lock, lock_async};

/// The engine's root file system as an ext4 image (built with debootstrap first if needed).
pub fn engine_rootfs_image() -> Result<PathBuf> {
    let recipe = RootfsRecipe::builtin(ENGINE_ROOTFS)
        .ok_or_else(|| anyhow!("no built-in root file system {ENGINE_ROOTFS}"))?;
    let out = engine_dir().join(format!("rootfs-{}.ext4", recipe.cache_key()));
    if out.exists() {
        return Ok(out);
    }
    let root = ensure_rootfs(&recipe)?;
    let _l = lock(&out)?;
    if out.exists() {
        return Ok(out);
    }
    for d in ["var/lib/docker", "opt/codex", "sys/fs/cgroup"] {
        fs::create_dir_all(root.join(d))?;
    }
    let used = du_bytes(&root)?;
    // Room for the engine's own writes to /etc, /var and logs (the disk is used copy-on-write).
    let size = used + used / 3 + (256 << 20);
    mkfs_from_dir(&root, &out, size, "nsm-engine-root")?;
    Ok(out)
}

/// An ext4 image of `dir` (owners, modes and setuid bits kept), written to a partial file
/// and renamed into place.
pub fn mkfs_from_dir(dir: &Path, out: &Path, size: u64, label: &str) -> Result<()> {
    let partial = out.with_extension("partial");
    let f = fs::File::create(&partial)
        .with_context(|| format!("failed to create {}", partial.display()))?;
    f.set_len(size)?;
    drop(f);
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-d"])
        .arg(dir)
        .arg(&partial)
        .stdin(Stdio::null())
        .output()
        .context("failed to run mkfs.ext4 (fix: apt-get install e2fsprogs)")?;
    if !o.status.success() {
        fs::remove_file(&partial).ok();
        bail!(
            "mkfs.ext4 -d {} failed ({}): {}",
            dir.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    fs::rename(&partial, out).with_context(|| format!("failed to move {}", out.display()))?;
    Ok(())
}

/// An empty ext4 image of `size` bytes (sparse), for a data disk to prepare.
pub fn mkfs_empty(out: &Path, size: u64, label: &str) -> Result<()> {
    let f = fs::File::create(out).with_context(|| format!("failed to create {}", out.display()))?;
    f.set_len(size)?;
    drop(f);
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .context("failed to run mkfs.ext4 (fix: apt-get install e2fsprogs)")?;
    if !o.status.success() {
        bail!(
            "mkfs.ext4 {} failed: {}",
            out.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn du_bytes(dir: &Path) -> Result<u64> {
    let o = Command::new("du")
        .args(["-s", "-B1", "--apparent-size"])
        .arg(dir)
        .output()
        .context("failed to run du")?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("du -s {} gave no size", dir.display()))
}

/// The modules of [`ENGINE_MODULES`] for a packaged kernel (file names in load order, in
/// `KERNEL/engine-modules/`); a built kernel has them built in and gets none.
pub fn engine_modules(kernel: &Kernel) -> Result<(PathBuf, Vec<String>)> {
    let dir = kernel.dir.join("engine-modules");
    let list = dir.join("load");
    if let Ok(text) = fs::read_to_string(&list) {
        return Ok((dir, text.lines().map(str::to_string).collect()));
    }
    let spec = kernels::Catalog::builtin().get(&kernel.facts.name)?.clone();
    if spec.is_built() {
        fs::create_dir_all(&dir)?;
        fs::write(&list, "")?;
        return Ok((dir, Vec::new()));
    }
    let (name, version) = kernel.facts.origin.split_once('@').ok_or_else(|| {
        anyhow!(
            "kernel origin {:?} is not package@version",
            kernel.facts.origin
        )
    })?;
    let _l = lock(&dir)?;
    let index = Mirror::from_env().index(&spec.suite)?;
    let pkg = index
        .get(name)
        .filter(|p| p.version == version)
        .ok_or_else(|| {
            anyhow!(
                "{name} {version} is no longer in {}'s index: refetch the kernel (nsmatrix kernels fetch {})",
                spec.suite,
                kernel.facts.name
            )
        })?
        .clone();
    let deb = index.fetch(&pkg)?;
    let tmp = kernel
        .dir
        .join(format!("engine-modules.tmp{}", std::process::id()));
    fs::remove_dir_all(&tmp).ok();
    extract_deb(&deb, &tmp.join("x"))?;
    let tree = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tmp.join("x").join(d).join(&kernel.facts.release))
        .find(|p| p.is_dir())
        .ok_or_else(|| anyhow!("{name} has no module tree for {}", kernel.facts.release))?;
    let out = tmp.join("out");
    fs::create_dir_all(&out)?;
    let names = kernels::copy_modules(&tree, &out, ENGINE_MODULES)?;
    fs::write(out.join("load"), names.join("\n"))?;
    fs::remove_dir_all(&dir).ok();
    fs::rename(&out, &dir)?;
    fs::remove_dir_all(&tmp).ok();
    Ok((dir, names))
}

/// The base initramfs of an engine guest: the stripped nsmatrix binary as `rdinit` and the
/// kernel's engine modules with their load list. Keyed by kernel and binary.
pub fn base_initrd(kernel: &Kernel) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the nsmatrix binary")?;
    let md = fs::metadata(&exe)?;
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update(kernel.dir.to_string_lossy().as_bytes());
    h.update(format!(
        "{}:{}:{}",
        exe.display(),
        md.len(),
        md.mtime_nsec() + md.mtime() * 1_000_000_000
    ));
    let key = &hex::encode(h.finalize())[..16];
    let out = engine_dir().join(format!("initrd-{}-{key}.cpio", kernel.facts.name));
    if out.exists() {
        return Ok(out);
    }
    let (mods_dir, mods) = engine_modules(kernel)?;
    let _l = lock(&out)?;
    if out.exists() {
        return Ok(out);
    }
    let stage = out.with_extension(format!("stage{}", std::process::id()));
    fs::remove_dir_all(&stage).ok();
    let agent = stage.join(GUEST_AGENT.trim_start_matches('/'));
    let mdir = stage.join(GUEST_MODULES_DIR.trim_start_matches('/'));
    fs::create_dir_all(&mdir)?;
    let o = Command::new("strip")
        .arg("-o")
        .arg(&agent)
        .arg(&exe)
        .output()
        .context("failed to run strip (binutils)")?;
    if !o.status.success() {
        fs::copy(&exe, &agent)?;
    }
    for m in &mods {
        fs::copy(mods_dir.join(m), mdir.join(m))?;
    }
    fs::write(
        stage.join(GUEST_MODULES_LIST.trim_start_matches('/')),
        mods.join("\n"),
    )?;
    write_cpio(&stage, &out)?;
    fs::remove_dir_all(&stage).ok();
    // Older bases of this kernel were for older binaries: each boot copies its base into its
    // run directory, so removing them never disturbs a running guest.
    let prefix = format!("initrd-{}-", kernel.facts.name);
    let keep = out.file_name().map(|n| n.to_string_lossy().into_owned());
    if let Ok(rd) = fs::read_dir(engine_dir()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let stem = n.trim_end_matches(".cpio").trim_end_matches(".lock");
            if n.starts_with(&prefix)
                && Some(format!("{stem}.cpio")) != keep
                && (n.ends_with(".cpio") || n.ends_with(".lock"))
            {
                fs::remove_file(e.path()).ok();
            }
        }
    }
    Ok(out)
}

/// A `newc` cpio archive of `dir`, every entry owned by root.
pub fn write_cpio(dir: &Path, out: &Path) -> Result<()> {
    let partial = out.with_extension("cpio-partial");
    let f = fs::File::create(&partial)?;
    let o = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0")
        .current_dir(dir)
        .stdout(f)
        .stderr(Stdio::piped())
        .output()
        .context("failed to run cpio (fix: apt-get install cpio)")?;
    if !o.status.success() {
        fs::remove_file(&partial).ok();
        bail!(
            "cpio of {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    fs::rename(&partial, out)?;
    Ok(())
}

/// The engine's suite, whose `apparmor` package an AppArmor engine guest gets.
const APPARMOR_SUITE: &str = "bookworm";
/// What of the `apparmor` package an engine needs: the parser dockerd runs to load
/// `docker-default`, and the configuration and includes (`tunables/global`,
/// `abstractions/base`) its generated profile names when they exist, as on a Debian host.
const APPARMOR_KEEP: &[&str] = &[
    "sbin/apparmor_parser",
    "etc/apparmor",
    "etc/apparmor.d",
    "usr/share/apparmor-features",
];

/// A `newc` cpio part holding AppArmor's tools under [`GUEST_APPARMOR_TOOLS`], laid out as in
/// the root file system (the engine guest's init copies them in). Cached by the package's hash;
/// the mirror is asked only when nothing is cached.
pub fn apparmor_tools() -> Result<PathBuf> {
    let prefix = "apparmor-tools-";
    if let Ok(rd) = fs::read_dir(engine_dir()) {
        let mut found: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with(prefix) && n.ends_with(".cpio")
            })
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    let index = Mirror::from_env().index(APPARMOR_SUITE)?;
    let pkg = index
        .get("apparmor")
        .ok_or_else(|| anyhow!("{APPARMOR_SUITE} has no apparmor package on the mirror"))?;
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update(&pkg.sha256);
    let key = &hex::encode(h.finalize())[..16];
    fs::create_dir_all(engine_dir())?;
    let out = engine_dir().join(format!("{prefix}{key}.cpio"));
    let _l = lock(&out)?;
    if out.exists() {
        return Ok(out);
    }
    let deb = index.fetch(pkg)?;
    let stage = out.with_extension(format!("stage{}", std::process::id()));
    fs::remove_dir_all(&stage).ok();
    let x = stage.join("x");
    extract_deb(&deb, &x)?;
    let tree = stage.join("tree");
    let to = tree.join(GUEST_APPARMOR_TOOLS.trim_start_matches('/'));
    for k in APPARMOR_KEEP {
        let from = x.join(k);
        if !from.exists() {
            bail!("the {APPARMOR_SUITE} apparmor package has no {k}");
        }
        let dest = to.join(k);
        fs::create_dir_all(dest.parent().unwrap())?;
        crate::backend::qemu::guest::copy_tree(&from, &dest)?;
    }
    write_cpio(&tree, &out)?;
    fs::remove_dir_all(&stage).ok();
    Ok(out)
}

/// The Codex npm package as a read-only ext4 image (mounted at `/opt/codex` in the guest).
pub fn codex_disk(version: &str) -> Result<PathBuf> {
    let pkg = crate::artifacts::npm::codex_package(version)?;
    let dir = pkg
        .codex
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected Codex package layout"))?
        .to_path_buf();
    let out = engine_dir().join(format!("codex-{version}.ext4"));
    if out.exists() {
        return Ok(out);
    }
    let _l = lock(&out)?;
    if out.exists() {
        return Ok(out);
    }
    let used = du_bytes(&dir)?;
    mkfs_from_dir(&dir, &out, used + used / 5 + (32 << 20), "nsm-codex")?;
    Ok(out)
}

/// `doctor`'s line about engine guests: the tools they need and what is cached.
pub fn doctor_line() -> String {
    let on_path = |t: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).exists()))
            .unwrap_or(false)
    };
    let missing: Vec<&str> = ["mkfs.ext4", "cpio", "strip", "debootstrap"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    let (mut images, mut disks) = (0, 0);
    if let Ok(rd) = fs::read_dir(engine_dir()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            images += usize::from(n.starts_with("rootfs-") && n.ends_with(".ext4"));
            disks += usize::from(n.starts_with("data-") && n.ends_with(".ext4"));
        }
    }
    let check = super::check_config::script()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "check-config.sh missing (apt-get install docker.io)".into());
    let tools = if missing.is_empty() {
        "tools present".to_string()
    } else {
        format!(
            "missing {} (fix: apt-get install e2fsprogs cpio binutils debootstrap)",
            missing.join(", ")
        )
    };
    format!(
        "{tools}; engine root file system images cached: {images}; data disks: {disks}; {check}"
    )
}
