//! Debian root filesystems built with debootstrap, cached by a hash of their [`RootfsRecipe`].
//!
//! [`ensure_rootfs`] returns a plain directory and [`ensure_rootfs_tar`] a tarball of it; neither
//! needs a Docker engine, so the Docker backend imports the tarball as a base image and the QEMU
//! backend turns the same tree into a guest's disk.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifacts::cache::{cache_dir, lock};

/// Bump when the way a recipe becomes a tree changes (post-processing, layout), so that every
/// cached tree is rebuilt.
const BUILD_FORMAT: u32 = 1;

/// `$NSMATRIX_DEBIAN_MIRROR`, else Debian's own redirector. Not part of a recipe's hash: every
/// mirror serves the same packages.
pub(crate) const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

const BUILTIN: &[(&str, &str)] = &[
    (
        "bookworm",
        include_str!("../../vm-images/rootfs/bookworm.toml"),
    ),
    ("trixie", include_str!("../../vm-images/rootfs/trixie.toml")),
    (
        "bookworm-engine",
        include_str!("../../vm-images/rootfs/bookworm-engine.toml"),
    ),
];

/// How to build one root filesystem (`vm-images/rootfs/NAME.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RootfsRecipe {
    pub name: String,
    /// A Debian suite debootstrap knows (`bookworm`, `trixie`).
    pub suite: String,
    #[serde(default = "default_variant")]
    pub variant: String,
    /// Extra packages (`--include`).
    #[serde(default)]
    pub include: Vec<String>,
    /// Packages left out (`--exclude`).
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    #[serde(default = "default_arch")]
    pub arch: String,
    #[serde(default)]
    pub description: String,
}

fn default_variant() -> String {
    "minbase".into()
}
fn default_components() -> Vec<String> {
    vec!["main".into()]
}
fn default_arch() -> String {
    "amd64".into()
}

impl RootfsRecipe {
    pub(crate) fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).context("failed to parse a root filesystem recipe")
    }

    /// A recipe shipped in `vm-images/rootfs/` (compiled in, so the binary needs no checkout).
    pub fn builtin(name: &str) -> Option<Self> {
        BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, text)| {
            Self::from_toml_str(text).expect("built-in root filesystem recipes parse")
        })
    }

    /// Hex SHA-256 over everything that changes the tree: not the name, the description or
    /// the mirror; package lists are order-insensitive.
    pub(crate) fn hash(&self) -> String {
        let mut include = self.include.clone();
        include.sort();
        include.dedup();
        let mut exclude = self.exclude.clone();
        exclude.sort();
        exclude.dedup();
        let canonical = serde_json::json!({
            "format": BUILD_FORMAT,
            "suite": self.suite,
            "variant": self.variant,
            "include": include,
            "exclude": exclude,
            "components": self.components,
            "arch": self.arch,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }

    /// The cache entry's directory name: readable name plus a short hash.
    pub(crate) fn cache_key(&self) -> String {
        let name: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{name}-{}", &self.hash()[..16])
    }

    fn debootstrap_args(&self, target: &Path, mirror: &str) -> Vec<String> {
        let mut args = vec![
            format!("--variant={}", self.variant),
            format!("--arch={}", self.arch),
            format!("--components={}", self.components.join(",")),
        ];
        if !self.include.is_empty() {
            args.push(format!("--include={}", self.include.join(",")));
        }
        if !self.exclude.is_empty() {
            args.push(format!("--exclude={}", self.exclude.join(",")));
        }
        args.push(self.suite.clone());
        args.push(target.display().to_string());
        args.push(mirror.to_string());
        args
    }
}

/// The mirror debootstrap uses: `$NSMATRIX_DEBIAN_MIRROR` or [`DEFAULT_MIRROR`].
pub(crate) fn mirror() -> String {
    std::env::var("NSMATRIX_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

fn rootfs_cache_root() -> PathBuf {
    cache_dir().join("rootfs")
}

/// The directory of a recipe's root filesystem, built with debootstrap on first use (about
/// 40 s; needs root and the Debian mirror) and reused while the recipe is unchanged. Blocking:
/// call it from `spawn_blocking` in async code. Safe against concurrent callers (a file lock).
pub fn ensure_rootfs(recipe: &RootfsRecipe) -> Result<PathBuf> {
    let entry = rootfs_cache_root().join(recipe.cache_key());
    let root = entry.join("root");
    let manifest = entry.join("manifest.json");
    if manifest.exists() && root.is_dir() {
        return Ok(root);
    }
    let _lock = lock(&entry)?;
    if manifest.exists() && root.is_dir() {
        return Ok(root);
    }
    build(recipe, &entry, &mirror())
        .with_context(|| format!("failed to build root filesystem {:?}", recipe.name))?;
    Ok(root)
}

/// A tarball (uncompressed, numeric owners) of [`ensure_rootfs`]'s tree, cached beside it.
pub(crate) fn ensure_rootfs_tar(recipe: &RootfsRecipe) -> Result<PathBuf> {
    let root = ensure_rootfs(recipe)?;
    let entry = root.parent().expect("root has a parent").to_path_buf();
    let tarball = entry.join("rootfs.tar");
    if tarball.exists() {
        return Ok(tarball);
    }
    let _lock = lock(&entry)?;
    if tarball.exists() {
        return Ok(tarball);
    }
    let partial = entry.join("rootfs.tar.partial");
    // GNU tar keeps hard links, device nodes and setuid bits exactly as debootstrap made them.
    let out = Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&partial)
        .arg(".")
        .stdin(Stdio::null())
        .output()
        .context("failed to run tar")?;
    if !out.status.success() {
        fs::remove_file(&partial).ok();
        bail!(
            "tar of {} failed ({}): {}",
            root.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::rename(&partial, &tarball)
        .with_context(|| format!("failed to move {} into place", tarball.display()))?;
    Ok(tarball)
}

fn build(recipe: &RootfsRecipe, entry: &Path, mirror: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "debootstrap needs root (run nsmatrix as root, or build the root filesystem once as root)"
        );
    }
    let partial = entry.with_extension("partial");
    if partial.exists() {
        // A killed debootstrap may leave /proc or /sys mounted inside its target: unmount
        // first, or removing the tree would reach into them.
        unmount_below(&partial);
        fs::remove_dir_all(&partial)
            .with_context(|| format!("failed to remove {}", partial.display()))?;
    }
    if entry.exists() {
        unmount_below(entry);
        fs::remove_dir_all(entry)
            .with_context(|| format!("failed to remove {}", entry.display()))?;
    }
    let target = partial.join("root");
    fs::create_dir_all(&target)
        .with_context(|| format!("failed to create {}", target.display()))?;
    let log_path = partial.join("debootstrap.log");
    let log = fs::File::create(&log_path)?;
    let args = recipe.debootstrap_args(&target, mirror);
    let status = Command::new("debootstrap")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status();
    let status = match status {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("debootstrap is not installed (fix: apt-get install debootstrap)")
        }
        Err(e) => return Err(e).context("failed to run debootstrap"),
    };
    unmount_below(&partial);
    if !status.success() {
        let tail = crate::text::tail_of_file(&log_path, 20);
        bail!(
            "debootstrap {} failed ({status}); log tail:\n{tail}",
            args.join(" ")
        );
    }
    tidy(&target)?;
    fs::write(
        target.join("etc/nsmatrix-rootfs"),
        format!(
            "name={}\nsuite={}\nrecipe={}\n",
            recipe.name,
            recipe.suite,
            recipe.hash()
        ),
    )?;
    let manifest = serde_json::json!({
        "recipe": recipe,
        "hash": recipe.hash(),
        "mirror": mirror,
        "debootstrap-args": args,
    });
    let mut f = fs::File::create(partial.join("manifest.json"))?;
    f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    f.sync_all()?;
    fs::rename(&partial, entry)
        .with_context(|| format!("failed to move {} into place", entry.display()))?;
    Ok(())
}

/// Drop what only the build needed: downloaded packages and apt's lists.
fn tidy(root: &Path) -> Result<()> {
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let d = root.join(dir);
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_file() && p.file_name().is_some_and(|n| n != "lock") {
                fs::remove_file(&p).ok();
            }
        }
    }
    Ok(())
}

fn unmount_below(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; MNT_DETACH cannot block on a busy mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse() {
        for name in BUILTIN.iter().map(|(n, _)| *n) {
            let r = RootfsRecipe::builtin(name).unwrap();
            assert_eq!(r.name, name);
            assert!(r.include.iter().any(|p| p == "bubblewrap"));
        }
        assert!(RootfsRecipe::builtin("nope").is_none());
    }

    #[test]
    fn hash_ignores_order_name_and_description() {
        let a = RootfsRecipe::builtin("bookworm").unwrap();
        let mut b = a.clone();
        b.include.reverse();
        b.name = "other".into();
        b.description = "changed".into();
        assert_eq!(a.hash(), b.hash());
        let mut c = a.clone();
        c.include.push("strace".into());
        assert_ne!(a.hash(), c.hash());
        assert_ne!(a.hash(), RootfsRecipe::builtin("trixie").unwrap().hash());
        assert!(a.cache_key().starts_with("bookworm-"));
    }

    #[test]
    fn debootstrap_argv() {
        let r = RootfsRecipe::builtin("bookworm").unwrap();
        let args = r.debootstrap_args(Path::new("/t"), "http://m/debian");
        assert_eq!(
            args,
            [
                "--variant=minbase",
                "--arch=amd64",
                "--components=main",
                "--include=bubblewrap,busybox",
                "bookworm",
                "/t",
                "http://m/debian"
            ]
        );
    }

    #[test]
    fn unknown_recipe_keys_are_rejected() {
        assert!(RootfsRecipe::from_toml_str("name='x'\nsuite='y'\nbogus=1").is_err());
    }

    /// Builds the real thing (root, network, ~40 s): `cargo test -- --ignored rootfs_builds`.
    #[test]
    #[ignore]
    fn rootfs_builds() {
        let r = RootfsRecipe::builtin("bookworm").unwrap();
        let root = ensure_rootfs(&r).unwrap();
        assert!(root.join("usr/bin/bwrap").exists());
        assert!(root.join("bin/busybox").exists());
        let tar = ensure_rootfs_tar(&r).unwrap();
        assert!(fs::metadata(tar).unwrap().len() > 10 << 20);
    }
}
