//! [`GuestImage`]: the initramfs a guest boots. Concatenated `newc` cpio archives (the kernel
//! unpacks them all): a cached base (a small root file system from Debian packages —
//! `bubblewrap`, `busybox-static` and their dependencies — plus the kernel's modules) with the
//! static agent appended (cached per base and agent build), then a small per-batch part (the
//! batch spec, the scenario directories, Codex where a cell needs it).
//!
//! Why a small initramfs and not a debootstrap'd image: TCG unpacks and pages in every byte, so
//! a ~10 MB initramfs boots in a fraction of the time of a 200 MB image, and it needs neither a
//! block driver nor ext4 in the guest (Debian's generic kernels have both as modules).

use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::agent::init::{
    GUEST_AGENT, GUEST_BATCH, GUEST_CODEX_ROOT, GUEST_DISK_MODULES_DIR, GUEST_DISKS,
    GUEST_MODULES_DIR, GUEST_MODULES_LIST,
};
use crate::artifacts::cache::cache_dir;
use crate::artifacts::debian::{Mirror, extract_deb};
use crate::artifacts::kernels::Kernel;
use crate::protocol::{BatchSpec, Carry, Layout, SubjectSpec, relocate};

/// Bump when the root file system's recipe changes.
const ROOTFS_RECIPE: &str = "debs:bubblewrap,busybox-static;merged-usr;pruned v1";
const ROOTFS_PACKAGES: &[&str] = &["bubblewrap", "busybox-static"];
/// Never needed by bwrap and heavy or maintainer-script-only.
const ROOTFS_EXCLUDE: &[&str] = &["debconf", "perl-base", "dpkg", "tar", "coreutils"];
const PRUNE: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
];
/// busybox applets linked into /usr/bin for the shell and scripts.
const APPLETS: &[&str] = &[
    "sh", "ash", "ls", "cat", "cp", "mv", "rm", "mkdir", "rmdir", "ln", "chmod", "chown", "id",
    "echo", "env", "grep", "sed", "head", "tail", "ps", "mount", "umount", "uname", "sysctl",
    "dmesg", "stat", "find", "diff", "touch", "true", "false", "sleep", "su", "whoami", "vi",
    "less", "wc", "sort", "tr", "poweroff", "reboot",
];
/// The guest's user for the sandbox (the batch's uid decides; these are the names).
pub(crate) const GUEST_USER_UID: u32 = 1000;

/// The newest cached root file system of a suite, without asking the mirror.
pub(crate) fn cached_rootfs(suite: &str) -> Option<PathBuf> {
    let prefix = format!("rootfs-{suite}-");
    let mut dirs: Vec<_> = fs::read_dir(cache_dir().join("guest"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| {
            e.path().join("etc/passwd").exists()
                && !e.file_name().to_string_lossy().contains(".tmp")
        })
        .collect();
    dirs.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    Some(dirs.last()?.path())
}

/// The base root file system of a suite: the cached one, else built from the mirror's newest
/// packages (`refresh` rebuilds it when the mirror has newer ones).
pub(crate) fn ensure_rootfs(suite: &str, refresh: bool) -> Result<PathBuf> {
    if !refresh {
        if let Some(d) = cached_rootfs(suite) {
            return Ok(d);
        }
    }
    let index = Mirror::from_env().index(suite)?;
    let pkgs = index.closure(ROOTFS_PACKAGES, ROOTFS_EXCLUDE)?;
    let mut h = Sha256::new();
    h.update(ROOTFS_RECIPE);
    let mut shas: Vec<&str> = pkgs.iter().map(|p| p.sha256.as_str()).collect();
    shas.sort();
    for s in shas {
        h.update(s);
    }
    let key = &hex::encode(h.finalize())[..16];
    let dir = cache_dir()
        .join("guest")
        .join(format!("rootfs-{suite}-{key}"));
    if dir.join("etc/passwd").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(unique_tmp());
    let _ = fs::remove_dir_all(&tmp);
    let root = tmp.join("root");
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var/tmp",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(to, root.join(link))?;
    }
    for p in &pkgs {
        let deb = index.fetch(p)?;
        let x = tmp.join("x").join(&p.name);
        extract_deb(&deb, &x)?;
        merge_usr(&x, &root).with_context(|| format!("failed to merge {}", p.name))?;
    }
    for p in PRUNE {
        let _ = fs::remove_dir_all(root.join(p));
    }
    let _ = fs::remove_dir_all(root.join("usr/lib/x86_64-linux-gnu/gconv"));
    if !root.join("usr/bin/busybox").exists() {
        bail!("busybox-static of {suite} has no usr/bin/busybox");
    }
    for a in APPLETS {
        let l = root.join("usr/bin").join(a);
        if fs::symlink_metadata(&l).is_err() {
            std::os::unix::fs::symlink("busybox", l)?;
        }
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(root.join("var/tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::write(
        root.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\nnsmatrix:x:{GUEST_USER_UID}:{GUEST_USER_UID}:nsmatrix:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        ),
    )?;
    fs::write(
        root.join("etc/group"),
        format!("root:x:0:\ntty:x:5:\nnsmatrix:x:{GUEST_USER_UID}:\nnogroup:x:65534:\n"),
    )?;
    fs::write(root.join("etc/hostname"), "nsmatrix-guest\n")?;
    fs::write(
        root.join("etc/os-release"),
        format!("ID=debian\nVERSION_CODENAME={suite}\nNAME=\"nsmatrix guest ({suite})\"\n"),
    )?;
    fs::remove_dir_all(tmp.join("x")).ok();
    if dir.exists() {
        fs::remove_dir_all(&dir).ok();
    }
    fs::rename(&root, &dir)?;
    fs::remove_dir_all(&tmp).ok();
    Ok(dir)
}

/// The suite's `apparmor` package unpacked (cached, newest first, without asking the mirror
/// when one is cached): `usr/sbin/apparmor_parser` and `etc/apparmor.d/abi/`. Its only other
/// dependencies (libc6, debconf) are in the root file system or not needed.
pub(crate) fn ensure_apparmor_tools(suite: &str) -> Result<PathBuf> {
    let prefix = format!("apparmor-{suite}-");
    let ok = |d: &Path| d.join("usr/sbin/apparmor_parser").is_file();
    if let Ok(rd) = fs::read_dir(cache_dir().join("guest")) {
        let mut dirs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&prefix) && !n.contains(".tmp")
            })
            .map(|e| e.path())
            .filter(|p| ok(p))
            .collect();
        dirs.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
        if let Some(d) = dirs.pop() {
            return Ok(d);
        }
    }
    let index = Mirror::from_env().index(suite)?;
    let pkg = index
        .get("apparmor")
        .with_context(|| format!("the {suite} index has no apparmor package"))?;
    let dir = cache_dir()
        .join("guest")
        .join(format!("apparmor-{suite}-{}", &pkg.sha256[..16]));
    if ok(&dir) {
        return Ok(dir);
    }
    let deb = index.fetch(pkg)?;
    let tmp = dir.with_extension(unique_tmp());
    let _ = fs::remove_dir_all(&tmp);
    extract_deb(&deb, &tmp)?;
    // Before merged /usr (bullseye) the parser is /sbin/apparmor_parser.
    if !ok(&tmp) && tmp.join("sbin/apparmor_parser").is_file() {
        fs::create_dir_all(tmp.join("usr/sbin"))?;
        fs::rename(
            tmp.join("sbin/apparmor_parser"),
            tmp.join("usr/sbin/apparmor_parser"),
        )?;
    }
    if !ok(&tmp) {
        bail!("the apparmor package of {suite} has no apparmor_parser");
    }
    fs::create_dir_all(tmp.join("etc/apparmor.d/abi"))?;
    if dir.exists() {
        fs::remove_dir_all(&dir).ok();
    }
    fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// Copy an extracted package into a merged-/usr root (`/bin/x` lands in `/usr/bin/x`).
fn merge_usr(from: &Path, root: &Path) -> Result<()> {
    for e in fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        let target = match name.to_str() {
            Some(n @ ("bin" | "sbin" | "lib" | "lib64")) => root.join("usr").join(n),
            _ => root.join(&name),
        };
        copy_tree(&e.path(), &target)?;
    }
    Ok(())
}

/// Copy a file, symlink or directory tree, keeping modes (used on the host and in guests).
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let md = fs::symlink_metadata(from)?;
    if md.file_type().is_symlink() {
        let _ = fs::remove_file(to);
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if md.is_dir() {
        fs::create_dir_all(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else {
        let _ = fs::remove_file(to);
        fs::copy(from, to).with_context(|| format!("failed to copy {}", from.display()))?;
        fs::set_permissions(to, md.permissions())?;
    }
    Ok(())
}

/// A cached base initramfs for a kernel and a root file system.
pub(crate) fn ensure_base(kernel: &Kernel, rootfs: &Path) -> Result<PathBuf> {
    let kkey = kernel
        .dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let rkey = rootfs
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let out = cache_dir()
        .join("guest")
        .join(format!("base-{}-{kkey}-{rkey}.cpio", kernel.facts.name));
    if out.exists() {
        return Ok(out);
    }
    let tmp = out.with_extension(unique_tmp());
    let mut w = Cpio::new(BufWriter::new(fs::File::create(&tmp)?));
    w.tree(rootfs, "")?;
    w.dir("nsmatrix", 0o755)?;
    w.dir(GUEST_MODULES_DIR.trim_start_matches('/'), 0o755)?;
    let mut list = String::new();
    for m in &kernel.facts.modules {
        let data = fs::read(kernel.modules_dir().join(m))?;
        w.file(
            &format!("{}/{m}", GUEST_MODULES_DIR.trim_start_matches('/')),
            0o644,
            &data,
        )?;
        list.push_str(m);
        list.push('\n');
    }
    w.file(
        GUEST_MODULES_LIST.trim_start_matches('/'),
        0o644,
        list.as_bytes(),
    )?;
    commit_cpio(w, &tmp, &out)?;
    Ok(out)
}

/// What QEMU boots for `kernel`: the kernel's own uncompressed image through its PVH entry
/// where the kernel has one (`CONFIG_PVH=y`, Debian's kernels), else the bzImage. Under TCG the
/// bzImage's decompressor is emulated instruction by instruction (XZ: several seconds per
/// boot); the uncompressed image is the same kernel, decompressed once here from the same
/// bzImage and cached beside it. Any failure falls back to the bzImage.
pub(crate) fn boot_image(kernel: &Kernel) -> PathBuf {
    let bz = kernel.vmlinuz();
    let out = kernel.dir.join("vmlinux-pvh");
    if out.exists() {
        return out;
    }
    let pvh = fs::read_to_string(kernel.dir.join("config"))
        .is_ok_and(|c| c.lines().any(|l| l.trim() == "CONFIG_PVH=y"));
    if !pvh {
        return bz;
    }
    match extract_vmlinux(&bz, &out) {
        Ok(()) => out,
        Err(e) => {
            eprintln!(
                "nsmatrix: booting {} compressed (its uncompressed image could not be extracted: {e:#})",
                bz.display()
            );
            bz
        }
    }
}

/// Decompress a bzImage's payload (XZ or zstd, located by its boot protocol header) into
/// `out`, an ELF image.
fn extract_vmlinux(bz: &Path, out: &Path) -> Result<()> {
    let b = fs::read(bz).with_context(|| format!("failed to read {}", bz.display()))?;
    let u32_at = |o: usize| -> Result<usize> {
        let s = b.get(o..o + 4).context("a truncated bzImage")?;
        Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize)
    };
    anyhow::ensure!(b.get(0x202..0x206) == Some(b"HdrS"), "not a bzImage");
    let setup_sects = match b.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    // The payload ends with its uncompressed size (4 bytes), which no decompressor reads.
    let len = u32_at(0x24c)?.checked_sub(4).context("an empty payload")?;
    let payload = b.get(start..start + len).context("a truncated payload")?;
    let tool: &[&str] = if payload.starts_with(b"\xfd7zXZ\x00") {
        &["xz", "-dc", "--single-stream"]
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        &["zstd", "-dcq"]
    } else {
        bail!("its payload is neither XZ nor zstd");
    };
    let tmp = out.with_extension(unique_tmp());
    let mut child = std::process::Command::new(tool[0])
        .args(&tool[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(fs::File::create(&tmp)?)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to run {}", tool[0]))?;
    let mut stdin = child.stdin.take().expect("piped");
    let payload = payload.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let o = child.wait_with_output()?;
    let wrote = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?;
    let elf = fs::read(&tmp)
        .map(|d| d.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if !o.status.success() || wrote.is_err() || !elf {
        let _ = fs::remove_file(&tmp);
        bail!(
            "{} failed ({}): {}",
            tool[0],
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    fs::rename(&tmp, out)?;
    Ok(())
}

/// The batch's work dir inside a guest.
pub(crate) const GUEST_WORK_DIR: &str = "/var/tmp/nsmatrix-work";

/// Where a batch's files land inside a guest.
pub(crate) const GUEST_LAYOUT: Layout<'static> = Layout {
    agent: GUEST_AGENT,
    root: GUEST_AGENT_DIR,
    work_dir: GUEST_WORK_DIR,
};

/// The read-only disks a batch's guest mounts: one cached ext4 image per Codex version its
/// cells run (never in the initramfs: a Codex binary is 130-315 MB, which TCG would unpack on
/// every boot), and the modules the guest's kernel needs to read them.
#[derive(Debug, Clone, Default)]
pub(crate) struct GuestDisks {
    /// (image, virtio serial, mount point in the guest).
    pub disks: Vec<(PathBuf, String, String)>,
    /// A Codex binary as the host's spec names it → its package directory in the guest.
    pub codex: Vec<(PathBuf, String)>,
    /// Modules loaded before mounting (a packaged kernel's virtio_blk, ext4 and their
    /// dependencies): their directory and file names in load order.
    pub modules: Option<(PathBuf, Vec<String>)>,
    /// The suite's unpacked `apparmor` package ([`ensure_apparmor_tools`]) when the batch
    /// loads an AppArmor policy: its `apparmor_parser` and ABI files join the initramfs.
    pub apparmor_tools: Option<PathBuf>,
}

impl GuestDisks {
    /// The disks `spec`'s Codex cells need (none for a batch without Codex), built and cached
    /// by [`codex_disk`](crate::backend::guest_docker::engine::disks::codex_disk) once per
    /// version.
    pub(crate) fn for_batch(kernel: &Kernel, spec: &BatchSpec) -> Result<GuestDisks> {
        use crate::backend::guest_docker::engine::disks;
        let mut wanted: Vec<(String, PathBuf)> = Vec::new();
        for c in &spec.cells {
            if let SubjectSpec::Codex {
                version, codex_bin, ..
            } = &c.subject
                && !wanted.iter().any(|(_, b)| b == codex_bin)
            {
                wanted.push((version.clone(), codex_bin.clone()));
            }
        }
        let mut out = GuestDisks::default();
        if wanted.is_empty() {
            return Ok(out);
        }
        for (i, (version, bin)) in wanted.into_iter().enumerate() {
            // A package that is not cached leaves its cells to SKIP in the guest, as elsewhere.
            if !bin.is_file() {
                continue;
            }
            let image = disks::codex_disk(&version)?;
            let mount = format!("{GUEST_CODEX_ROOT}/{version}");
            out.disks
                .push((image, format!("nsm-codex-{i}"), mount.clone()));
            out.codex.push((bin, mount));
        }
        let (dir, names) = disks::engine_modules(kernel)?;
        out.modules = Some((dir, names));
        Ok(out)
    }

    /// The (image, serial) pairs for the launcher.
    pub(crate) fn drives(&self) -> Vec<(PathBuf, String)> {
        self.disks
            .iter()
            .map(|(f, s, _)| (f.clone(), s.clone()))
            .collect()
    }
}

/// Write the per-batch initramfs: the cached base-and-agent archive ([`with_agent`]) followed
/// by what only this batch has: the spec and what [`relocate`] says it needs besides the agent
/// (scenarios; Codex packages come on `disks` instead). Returns the guest's spec.
pub(crate) fn write_batch_initrd(
    base: &Path,
    spec: &BatchSpec,
    disks: &GuestDisks,
    dest: &Path,
) -> Result<BatchSpec> {
    let (mut guest_spec, mut carry) = relocate(spec, &GUEST_LAYOUT);
    // Codex runs from its disk, where the agent mounts it: nothing of it is carried.
    let codex_carried = format!("{}/codex/", GUEST_LAYOUT.root);
    carry
        .retain(|c| !matches!(c, Carry::File { inside, .. } if inside.starts_with(&codex_carried)));
    for (host_cell, cell) in spec.cells.iter().zip(guest_spec.cells.iter_mut()) {
        if let (
            SubjectSpec::Codex {
                codex_bin: host, ..
            },
            SubjectSpec::Codex { codex_bin, .. },
        ) = (&host_cell.subject, &mut cell.subject)
        {
            *codex_bin = match disks.codex.iter().find(|(h, _)| h == host) {
                Some((_, dir)) => PathBuf::from(format!("{dir}/bin/codex")),
                // Not on any disk (not cached): the agent SKIPs it as not in this environment.
                None => PathBuf::from(format!("{GUEST_CODEX_ROOT}/missing/bin/codex")),
            };
        }
    }
    let boot = with_agent(base, &spec.agent_bin)?;
    // An in-kernel copy of the cached part; the batch's own part is appended.
    fs::copy(&boot, dest).with_context(|| format!("failed to copy {}", boot.display()))?;
    let f = fs::OpenOptions::new().append(true).open(dest)?;
    let mut w = Cpio::new(BufWriter::new(f));
    // The base holds the agent's directory.
    let mut made =
        std::collections::BTreeSet::from([PathBuf::from(GUEST_AGENT_DIR.trim_start_matches('/'))]);
    for c in &carry {
        let inside = match c {
            Carry::File { host, .. } if *host == spec.agent_bin => continue,
            Carry::File { inside, .. } | Carry::Dir { inside, .. } => inside,
        };
        // The kernel's unpacker creates no parents: every directory first.
        let rel = Path::new(inside.trim_start_matches('/'));
        let parents: Vec<&Path> = rel
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        for p in parents.into_iter().rev() {
            if made.insert(p.to_path_buf()) {
                w.dir(&p.to_string_lossy(), 0o755)?;
            }
        }
        match c {
            Carry::File { host, inside, mode } => {
                let data =
                    fs::read(host).with_context(|| format!("failed to read {}", host.display()))?;
                w.file(inside.trim_start_matches('/'), *mode, &data)?;
            }
            Carry::Dir { host, inside } => w.tree(host, inside.trim_start_matches('/'))?,
        }
    }
    if let Some(tools) = &disks.apparmor_tools {
        // Only the parser and the ABI files its profiles name: the package's own profiles and
        // tools stay out (every byte of the initramfs costs TCG boot time).
        let parser = tools.join("usr/sbin/apparmor_parser");
        let data =
            fs::read(&parser).with_context(|| format!("failed to read {}", parser.display()))?;
        w.file("usr/sbin/apparmor_parser", 0o755, &data)?;
        w.dir("etc/apparmor.d", 0o755)?;
        w.tree(&tools.join("etc/apparmor.d/abi"), "etc/apparmor.d/abi")?;
        // Not the package's parser.conf: trixie's pins the compiled policy to a feature set
        // under /usr/share/apparmor-features; without it the parser compiles for the features
        // the guest's kernel has (the parser warns that the file is missing).
    }
    if !disks.disks.is_empty() {
        let mut list = String::new();
        for (_, serial, mount) in &disks.disks {
            list.push_str(&format!("{serial} {mount}\n"));
        }
        w.file(GUEST_DISKS.trim_start_matches('/'), 0o644, list.as_bytes())?;
        if let Some((dir, names)) = &disks.modules {
            let at = GUEST_DISK_MODULES_DIR.trim_start_matches('/');
            w.dir(at, 0o755)?;
            for m in names {
                let data = fs::read(dir.join(m))
                    .with_context(|| format!("failed to read {}", dir.join(m).display()))?;
                w.file(&format!("{at}/{m}"), 0o644, &data)?;
            }
            w.file(&format!("{at}/load"), 0o644, names.join("\n").as_bytes())?;
        }
    }
    w.file(
        GUEST_BATCH.trim_start_matches('/'),
        0o644,
        &serde_json::to_vec(&guest_spec)?,
    )?;
    // A scratch file QEMU reads at once: no fsync (a crash leaves nothing worth keeping).
    w.finish()?.into_inner().map_err(|e| e.into_error())?;
    Ok(guest_spec)
}

/// Finish a cached archive written to `tmp`, sync it and move it to `out` (a reader never sees
/// a partial one).
fn commit_cpio(w: Cpio<BufWriter<fs::File>>, tmp: &Path, out: &Path) -> Result<()> {
    w.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    fs::rename(tmp, out)?;
    Ok(())
}

/// Where the agent's directory is in the guest (`/nsmatrix`).
const GUEST_AGENT_DIR: &str = "/nsmatrix";

/// `base` followed by the agent without debug info, cached per base and agent build: what
/// every batch of a kernel × root file system boots, built once.
fn with_agent(base: &Path, agent: &Path) -> Result<PathBuf> {
    let key = agent_key(agent)?;
    let stem = base
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let out = base.with_file_name(format!("{stem}+agent-{key}.cpio"));
    if out.exists() {
        return Ok(out);
    }
    let stripped = stripped_agent(agent)?;
    let data = fs::read(&stripped)
        .with_context(|| format!("failed to read the agent {}", stripped.display()))?;
    let tmp = out.with_extension(unique_tmp());
    fs::copy(base, &tmp).with_context(|| format!("failed to copy {}", base.display()))?;
    let f = fs::OpenOptions::new().append(true).open(&tmp)?;
    let mut w = Cpio::new(BufWriter::new(f));
    w.file(GUEST_AGENT.trim_start_matches('/'), 0o755, &data)?;
    commit_cpio(w, &tmp, &out)?;
    Ok(out)
}

/// What the bare boot's init prints before it powers off.
pub(crate) const BARE_MARK: &str = "nsmatrix-bare-boot-init";

/// `base` followed by an init script at the agent's path that ends the guest at once the way
/// the agent does (a reboot, which `-no-reboot` turns into QEMU's exit; it works on kernels
/// without ACPI too): the bare boot [`super::QemuBackend::bare_boot`] compares a batch with.
pub(crate) fn write_bare_initrd(base: &Path, dest: &Path) -> Result<()> {
    fs::copy(base, dest).with_context(|| format!("failed to copy {}", base.display()))?;
    let f = fs::OpenOptions::new().append(true).open(dest)?;
    let mut w = Cpio::new(BufWriter::new(f));
    w.file(
        GUEST_AGENT.trim_start_matches('/'),
        0o755,
        // Through the kernel's log, written to the console at once (a tty's buffer would be
        // lost to the immediate reboot).
        format!(
            "#!/bin/sh\nmount -t devtmpfs dev /dev\necho '<1>{BARE_MARK}' >/dev/kmsg\nexec reboot -f\n"
        )
        .as_bytes(),
    )?;
    w.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(())
}

/// A copy of the agent without debug info (cached by size and mtime): under TCG every byte of
/// the initramfs costs boot time, and debug info can be half of the binary. Without `strip`
/// the binary is used as it is.
fn stripped_agent(agent: &Path) -> Result<PathBuf> {
    let out = cache_dir()
        .join("guest")
        .join(format!("agent-{}", agent_key(agent)?));
    if out.exists() {
        return Ok(out);
    }
    fs::create_dir_all(out.parent().unwrap_or(Path::new("/")))?;
    let tmp = out.with_extension(unique_tmp());
    match std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(agent)
        .status()
    {
        Ok(s) if s.success() => {
            fs::rename(&tmp, &out)?;
            Ok(out)
        }
        _ => {
            let _ = fs::remove_file(&tmp);
            Ok(agent.to_path_buf())
        }
    }
}

/// An agent build's key: its path, size and modification time (never its bytes: no file is
/// re-hashed when nothing changed).
fn agent_key(agent: &Path) -> Result<String> {
    let md = fs::metadata(agent)
        .with_context(|| format!("failed to read the agent {}", agent.display()))?;
    let mut h = Sha256::new();
    h.update(agent.to_string_lossy().as_bytes());
    h.update(md.len().to_le_bytes());
    h.update(format!("{:?}", md.modified().ok()));
    Ok(hex::encode(h.finalize())[..16].to_string())
}

/// A scratch suffix unique per process and call (concurrent batches share the cache).
fn unique_tmp() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("tmp{}-{n}", std::process::id())
}

/// A `newc` cpio writer; every entry is owned by root (setuid copies in the guest need it).
pub(crate) struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    pub(crate) fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            namesize,
            0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.written += b.len() as u64;
        self.out.write_all(b)
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, 0o040000 | perm, &[])
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100000 | perm, data)
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120777, target.as_bytes())
    }

    /// Add a host directory tree under `prefix` ("" = the archive's root).
    pub(crate) fn tree(&mut self, dir: &Path, prefix: &str) -> Result<()> {
        if !prefix.is_empty() {
            self.dir(prefix, fs::metadata(dir)?.mode() & 0o7777)?;
        }
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let md = fs::symlink_metadata(e.path())?;
            let perm = md.mode() & 0o7777;
            if md.file_type().is_symlink() {
                self.symlink(&path, &fs::read_link(e.path())?.to_string_lossy())?;
            } else if md.is_dir() {
                self.tree(&e.path(), &path)?;
            } else if md.is_file() {
                self.file(&path, perm, &fs::read(e.path())?)?;
            }
        }
        Ok(())
    }

    /// Write the trailer (padded to 512 bytes, so another archive may follow).
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        let n = (512 - (self.written % 512) as usize) % 512;
        self.put(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in a newc archive (concatenated archives included), in order.
    fn names(buf: &[u8]) -> Vec<String> {
        let (mut out, mut at) = (Vec::new(), 0);
        let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let pad = |n: usize| n.div_ceil(4) * 4;
        while at + 110 <= buf.len() {
            if &buf[at..at + 6] != b"070701" {
                at += 512 - at % 512; // the padding after a trailer
                continue;
            }
            let size = hex(&buf[at + 54..at + 62]);
            let namesize = hex(&buf[at + 94..at + 102]);
            let name =
                String::from_utf8_lossy(&buf[at + 110..at + 110 + namesize - 1]).into_owned();
            at = pad(at + 110 + namesize);
            at = pad(at + size);
            if name != "TRAILER!!!" {
                out.push(name);
            }
        }
        out
    }

    #[test]
    fn a_batch_appends_only_its_own_part_to_the_cached_base_and_agent() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base-k-r.cpio");
        let mut w = Cpio::new(Vec::new());
        w.dir("nsmatrix", 0o755).unwrap();
        w.file("etc/passwd", 0o644, b"root:x:0:0::/:/bin/sh\n")
            .unwrap();
        fs::write(&base, w.finish().unwrap()).unwrap();
        let agent = d.path().join("agent");
        fs::write(&agent, b"not an ELF file: strip leaves it as it is").unwrap();
        let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/add_file");
        let spec = BatchSpec {
            version: crate::protocol::PROTOCOL_VERSION,
            batch_id: "b".into(),
            work_dir: "/w".into(),
            uid: 1000,
            gid: 1000,
            restrictions: Default::default(),
            sysctls: Default::default(),
            agent_bin: agent.clone(),
            kernel_log: None,
            cells: vec![crate::protocol::CellSpec {
                id: "c".into(),
                subject: crate::protocol::SubjectSpec::Bwrap {
                    build: "system".into(),
                    setuid: crate::protocol::SetuidMode::Never,
                    argv: crate::protocol::ArgvProfile::Codex,
                },
                scenario_dir: scenario,
                timeout_ms: 1000,
                needs_sysctls: vec![],
            }],
        };
        let dest = d.path().join("initrd");
        let guest = write_batch_initrd(&base, &spec, &GuestDisks::default(), &dest).unwrap();
        assert_eq!(guest.agent_bin, PathBuf::from(GUEST_AGENT));
        let cached: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("+agent-"))
            .collect();
        assert_eq!(cached.len(), 1, "base and agent cached once: {cached:?}");
        let cached = d.path().join(&cached[0]);
        let built = fs::metadata(&cached).unwrap().modified().unwrap();

        let all = names(&fs::read(&dest).unwrap());
        let agent_name = GUEST_AGENT.trim_start_matches('/');
        assert_eq!(
            all.iter().filter(|n| *n == agent_name).count(),
            1,
            "{all:?}"
        );
        assert!(all.contains(&GUEST_BATCH.trim_start_matches('/').to_string()));
        assert!(
            all.iter().any(|n| n.ends_with("add_file/patch.txt")),
            "{all:?}"
        );
        // The batch's part follows the cached archive byte for byte.
        let cached_bytes = fs::read(&cached).unwrap();
        assert!(fs::read(&dest).unwrap().starts_with(&cached_bytes));
        let own = names(&fs::read(&dest).unwrap()[cached_bytes.len()..]);
        assert!(!own.contains(&agent_name.to_string()), "{own:?}");
        assert!(!own.contains(&"etc/passwd".to_string()));

        // A second batch reuses the cached archive as it is.
        write_batch_initrd(
            &base,
            &spec,
            &GuestDisks::default(),
            &d.path().join("initrd2"),
        )
        .unwrap();
        assert_eq!(fs::metadata(&cached).unwrap().modified().unwrap(), built);
    }

    #[test]
    fn cpio_entries_are_aligned_and_readable_by_cpio() {
        let mut w = Cpio::new(Vec::new());
        w.dir("a", 0o755).unwrap();
        w.file("a/f", 0o4755, b"hello").unwrap();
        w.symlink("a/l", "f").unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 512, 0);
        assert!(buf.starts_with(b"070701"));
        let name_at = 110;
        assert_eq!(&buf[name_at..name_at + 2], b"a\0");
        let d = tempfile::tempdir().unwrap();
        let archive = d.path().join("x.cpio");
        fs::write(&archive, &buf).unwrap();
        if let Ok(out) = std::process::Command::new("cpio")
            .arg("-itv")
            .stdin(fs::File::open(&archive).unwrap())
            .output()
        {
            let list = String::from_utf8_lossy(&out.stdout);
            assert!(list.contains("-rwsr-xr-x"), "{list}");
            assert!(list.contains("a/l -> f"), "{list}");
        }
    }
}
