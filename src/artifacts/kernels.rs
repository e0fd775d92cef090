//! [`Catalog`] and [`Kernel`]: the kernels QEMU guests boot, from `vm-images/kernels.toml`.
//!
//! A packaged kernel is a Debian `linux-image-*` package; a built kernel is Debian's
//! `linux-source-*` configured from a base target plus a fragment kept in the repo. Either is
//! cached under `cache_dir()/kernels/NAME/KEY/` (KEY from the package's SHA-256, or from the
//! source's SHA-256 + base + fragment) with its `vmlinuz`, `config`, `System.map`, the modules a
//! guest needs (decompressed, in load order) and a `kernel.json` of facts read from the config.
//!
//! Past 600 lines on purpose: the catalog, fetching a packaged kernel and building one from
//! source share one cache layout and one verification.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache::{cache_dir, lock};
use super::debian::{Mirror, extract_deb};

/// The catalog shipped in the binary (so a copied binary needs no checkout).
const CATALOG: &str = include_str!("../../vm-images/kernels.toml");
/// Fragments named by the catalog, by their path relative to `vm-images/`.
const FRAGMENTS: &[(&str, &str)] = &[
    (
        "kernel-config/nouserns.config",
        include_str!("../../vm-images/kernel-config/nouserns.config"),
    ),
    (
        "kernel-config/synology-like-5.10.config",
        include_str!("../../vm-images/kernel-config/synology-like-5.10.config"),
    ),
];
/// Bump when the build steps change, so old builds are not reused.
const BUILD_RECIPE: &str = "tinyconfig+merge_config+olddefconfig+bzImage v1";
/// Modules a Debian generic kernel must load to reach the host: virtio over PCI and the
/// virtio-serial port that carries the results. Those built in are simply not found.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_console"];
/// The userns sysctls nsmatrix knows to look for.
pub const USERNS_SYSCTLS: &[&str] = &[
    "user.max_user_namespaces",
    "kernel.unprivileged_userns_clone",
];

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KernelSpec {
    #[serde(skip)]
    pub name: String,
    pub description: String,
    pub suite: String,
    /// A packaged kernel: the binary package (glob).
    pub package: Option<String>,
    /// A built kernel: the source package, the base make target and the fragment.
    pub source: Option<String>,
    pub base: Option<String>,
    pub fragment: Option<String>,
    /// The suite of the guest's root filesystem by default.
    pub rootfs: String,
}

impl KernelSpec {
    pub fn is_built(&self) -> bool {
        self.source.is_some()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    kernel: BTreeMap<String, KernelSpec>,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub kernels: Vec<KernelSpec>,
}

impl Catalog {
    /// The catalog compiled into the binary.
    pub fn builtin() -> Catalog {
        Catalog::parse(CATALOG).expect("vm-images/kernels.toml is valid (checked by a test)")
    }

    pub fn parse(text: &str) -> Result<Catalog> {
        let raw: RawCatalog = toml::from_str(text).context("failed to parse the kernel catalog")?;
        let mut kernels = Vec::new();
        for (name, mut k) in raw.kernel {
            k.name = name.clone();
            match (&k.package, &k.source) {
                (Some(_), None) => {}
                (None, Some(_)) if k.base.is_some() && k.fragment.is_some() => {}
                _ => {
                    bail!("kernel {name}: give either `package`, or `source` + `base` + `fragment`")
                }
            }
            kernels.push(k);
        }
        Ok(Catalog { kernels })
    }

    pub fn get(&self, name: &str) -> Result<&KernelSpec> {
        self.kernels.iter().find(|k| k.name == name).ok_or_else(|| {
            let names: Vec<_> = self.kernels.iter().map(|k| k.name.as_str()).collect();
            anyhow!(
                "unknown kernel {name:?} (the catalog has {})",
                names.join(", ")
            )
        })
    }
}

/// What a kernel supports, read from its config and symbol map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct KernelFacts {
    pub name: String,
    pub release: String,
    /// Where it came from: `package@version` or `source@version+fragment`.
    pub origin: String,
    pub user_ns: bool,
    /// Of [`USERNS_SYSCTLS`], those this kernel has.
    pub sysctls: Vec<String>,
    /// Modules copied for the guest, in load order (file names under `modules/`).
    pub modules: Vec<String>,
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub dir: PathBuf,
    pub facts: KernelFacts,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join("modules")
    }
    fn load(dir: &Path) -> Result<Kernel> {
        let j = fs::read(dir.join("kernel.json"))?;
        Ok(Kernel {
            dir: dir.to_path_buf(),
            facts: serde_json::from_slice(&j)?,
        })
    }
}

fn kernels_root() -> PathBuf {
    cache_dir().join("kernels")
}

/// A cached kernel of that name, whatever its key (no network). The newest wins. A built
/// kernel whose config lacks a line of the fragment compiled into this nsmatrix was built from
/// an older fragment and is not taken (the fragment changed: build again).
pub fn cached(name: &str) -> Option<Kernel> {
    let fragment = Catalog::builtin()
        .get(name)
        .ok()
        .and_then(|k| k.fragment.clone())
        .and_then(|f| FRAGMENTS.iter().find(|(p, _)| *p == f).map(|(_, t)| *t));
    let mut dirs: Vec<_> = fs::read_dir(kernels_root().join(name))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kernel.json").exists())
        .filter(|e| {
            fragment.is_none_or(|f| {
                fs::read_to_string(e.path().join("config"))
                    .is_ok_and(|c| check_fragment(f, &c).is_ok())
            })
        })
        .collect();
    dirs.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    Kernel::load(&dirs.last()?.path()).ok()
}

/// The kernel named, from the cache, else fetched (packages) or built (sources).
pub fn ensure(name: &str) -> Result<Kernel> {
    if let Some(k) = cached(name) {
        return Ok(k);
    }
    let cat = Catalog::builtin();
    let spec = cat.get(name)?;
    if spec.is_built() {
        build(spec)
    } else {
        fetch(spec)
    }
}

/// Fetch a packaged kernel (the newest of its glob in the suite's index).
pub fn fetch(spec: &KernelSpec) -> Result<Kernel> {
    let pattern = spec
        .package
        .as_deref()
        .ok_or_else(|| anyhow!("{} is built, not fetched", spec.name))?;
    let index = Mirror::from_env().index(&spec.suite)?;
    let pkg = index
        .find(pattern)
        .ok_or_else(|| anyhow!("no package matching {pattern} in {}", spec.suite))?
        .clone();
    let dir = kernels_root().join(&spec.name).join(&pkg.sha256[..16]);
    // One fetch per kernel at a time, across processes and threads alike: the others wait and
    // then find it cached.
    let _lock = lock(&dir)?;
    if dir.join("kernel.json").exists() {
        return Kernel::load(&dir);
    }
    let deb = index.fetch(&pkg)?;
    let tmp = scratch(&dir)?;
    let _cleanup = RemoveOnDrop(tmp.clone());
    let x = tmp.join("x");
    extract_deb(&deb, &x)?;
    let boot = x.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        fs::read_dir(&boot)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .ok_or_else(|| anyhow!("{} has no /boot/{prefix}*", pkg.name))
    };
    let vmlinuz = find("vmlinuz-")?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let out = tmp.join("out");
    fs::create_dir_all(out.join("modules"))?;
    fs::copy(&vmlinuz, out.join("vmlinuz"))?;
    fs::copy(find("config-")?, out.join("config"))?;
    fs::copy(find("System.map-")?, out.join("System.map"))?;
    // trixie's packages are merged-/usr: usr/lib/modules.
    let tree = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| x.join(d).join(&release))
        .find(|p| p.is_dir());
    let modules = match tree {
        Some(t) => copy_modules(&t, &out.join("modules"), GUEST_MODULES)?,
        None => Vec::new(),
    };
    let origin = format!("{}@{}", pkg.name, pkg.version);
    finish(spec, &out, &dir, release, origin, modules, &tmp)
}

/// Build a kernel from Debian's source package with the catalog's base and fragment.
pub fn build(spec: &KernelSpec) -> Result<Kernel> {
    let (Some(source), Some(base), Some(frag_path)) = (&spec.source, &spec.base, &spec.fragment)
    else {
        bail!("{} is a packaged kernel: fetch it", spec.name);
    };
    let fragment = FRAGMENTS
        .iter()
        .find(|(p, _)| p == frag_path)
        .map(|(_, t)| *t)
        .ok_or_else(|| anyhow!("fragment {frag_path} is not compiled into nsmatrix"))?;
    let index = Mirror::from_env().index(&spec.suite)?;
    let pkg = index
        .get(source)
        .ok_or_else(|| anyhow!("{source} is not in {}", spec.suite))?
        .clone();
    let key = build_key(&pkg.sha256, base, fragment);
    let dir = kernels_root().join(&spec.name).join(&key);
    // One build per kernel at a time (a build takes minutes, and two builders of one process
    // would share a scratch directory): the others wait and then find it cached.
    let _lock = lock(&dir)?;
    if dir.join("kernel.json").exists() {
        return Kernel::load(&dir);
    }
    let deb = index.fetch(&pkg)?;
    let tmp = scratch(&dir)?;
    let _cleanup = RemoveOnDrop(tmp.clone());
    let x = tmp.join("x");
    extract_deb(&deb, &x)?;
    let src_dir = x.join("usr/src");
    let tarball = fs::read_dir(&src_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
        .ok_or_else(|| anyhow!("{source} has no usr/src/*.tar.xz"))?;
    run(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tmp),
        "unpack the kernel source",
    )?;
    let tree = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("Makefile").exists())
        .ok_or_else(|| anyhow!("no kernel tree in {}", tarball.display()))?;
    let frag_file = tmp.join("fragment.config");
    fs::write(&frag_file, fragment)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("nice");
        c.args(["-n", "10", "make"]).args(args).current_dir(&tree);
        c
    };
    eprintln!(
        "nsmatrix: building {} from {source} {} (a few minutes)",
        spec.name, pkg.version
    );
    run(&mut make(&[base]), "make the base config")?;
    run(
        Command::new("scripts/kconfig/merge_config.sh")
            .args(["-m", ".config"])
            .arg(&frag_file)
            .current_dir(&tree),
        "merge the config fragment",
    )?;
    run(&mut make(&["olddefconfig"]), "make olddefconfig")?;
    let config = fs::read_to_string(tree.join(".config"))?;
    check_fragment(fragment, &config)?;
    let jobs = format!(
        "-j{}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    );
    run(&mut make(&[&jobs, "bzImage"]), "build the kernel")?;
    let out = tmp.join("out");
    fs::create_dir_all(out.join("modules"))?;
    fs::copy(tree.join("arch/x86/boot/bzImage"), out.join("vmlinuz"))?;
    fs::copy(tree.join(".config"), out.join("config"))?;
    fs::copy(tree.join("System.map"), out.join("System.map"))?;
    let release = fs::read_to_string(tree.join("include/config/kernel.release"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let origin = format!("{source}@{}+{frag_path}", pkg.version);
    finish(spec, &out, &dir, release, origin, Vec::new(), &tmp)
}

/// The cache key of a built kernel.
pub fn build_key(source_sha256: &str, base: &str, fragment: &str) -> String {
    let mut h = Sha256::new();
    for part in [BUILD_RECIPE, source_sha256, base, fragment] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// Every `CONFIG_X=v` / `# CONFIG_X is not set` line of the fragment must be in the result.
fn check_fragment(fragment: &str, config: &str) -> Result<()> {
    let have: BTreeMap<&str, &str> = config_values(config);
    let mut lost = Vec::new();
    for (k, v) in config_values(fragment) {
        let got = have.get(k).copied().unwrap_or("n");
        if got != v {
            lost.push(format!("{k}={v} (got {got})"));
        }
    }
    if lost.is_empty() {
        Ok(())
    } else {
        bail!(
            "the config fragment did not survive olddefconfig: {}",
            lost.join(", ")
        )
    }
}

fn config_values(text: &str) -> BTreeMap<&str, &str> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            m.insert(rest, "n");
        } else if let Some((k, v)) = line
            .split_once('=')
            .filter(|(k, _)| k.starts_with("CONFIG_"))
        {
            m.insert(k, v);
        }
    }
    m
}

/// Read facts from a kernel's config and its decompressed image (also for `kernels list`).
/// Debian's `System.map` is a stub, so the sysctls are found by their names in the image:
/// `kernel/ucount.c` names `max_user_namespaces`, Debian's patch `unprivileged_userns_clone`.
pub fn read_facts(config: &str, image: &[u8]) -> (bool, Vec<String>) {
    let cfg = config_values(config);
    let user_ns = cfg.get("CONFIG_USER_NS") == Some(&"y");
    let has = |s: &str| {
        let needle = format!("{s}\0");
        image.windows(needle.len()).any(|w| w == needle.as_bytes())
    };
    let mut sysctls = Vec::new();
    if cfg.get("CONFIG_SYSCTL") == Some(&"y") && has("max_user_namespaces") {
        sysctls.push(USERNS_SYSCTLS[0].to_string());
    }
    if has("unprivileged_userns_clone") {
        sysctls.push(USERNS_SYSCTLS[1].to_string());
    }
    (user_ns, sysctls)
}

/// The uncompressed kernel inside a bzImage: found by its compressor's magic and piped through
/// the matching tool (`xz`, `zstd` or `gzip`), trailing data ignored.
pub fn decompress_image(bz: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let formats: [(&[u8], &str); 3] = [
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x1f\x8b\x08\x00", "gzip"),
    ];
    for (magic, tool) in formats {
        let Some(at) = bz.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("failed to run {tool}"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let data = bz[at..].to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output()?;
        let _ = feeder.join();
        if out.stdout.len() > 1 << 20 {
            return Ok(out.stdout);
        }
    }
    bail!("no xz, zstd or gzip payload found in the kernel image")
}

fn finish(
    spec: &KernelSpec,
    out: &Path,
    dir: &Path,
    release: String,
    origin: String,
    modules: Vec<String>,
    tmp: &Path,
) -> Result<Kernel> {
    let config = fs::read_to_string(out.join("config"))?;
    let image = decompress_image(&fs::read(out.join("vmlinuz"))?)?;
    let (user_ns, sysctls) = read_facts(&config, &image);
    let facts = KernelFacts {
        name: spec.name.clone(),
        release,
        origin,
        user_ns,
        sysctls,
        modules,
    };
    fs::write(out.join("kernel.json"), serde_json::to_vec_pretty(&facts)?)?;
    if dir.exists() {
        fs::remove_dir_all(dir).ok();
    }
    fs::rename(out, dir)
        .with_context(|| format!("failed to move the kernel into {}", dir.display()))?;
    fs::remove_dir_all(tmp).ok();
    Kernel::load(dir)
}

/// Removes a scratch directory however the build ends (a failed kernel build leaves an
/// unpacked source tree of about a gigabyte otherwise).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A fresh scratch directory next to where the result goes (same file system for the rename).
fn scratch(dir: &Path) -> Result<PathBuf> {
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).ok();
    }
    fs::create_dir_all(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
    Ok(tmp)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to {what}: cannot run {cmd:?}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!("failed to {what} ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(())
}

/// Copy the modules `wanted` and their dependencies from a kernel's module tree into `dest`,
/// decompressed, and return their file names in load order (dependencies first).
pub(crate) fn copy_modules(tree: &Path, dest: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let mut by_name = BTreeMap::new();
    walk_modules(tree, &mut by_name)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        by_name: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        // Not a module: built in (or absent, which the guest will find out and say).
        let Some(path) = by_name.get(name) else {
            return Ok(());
        };
        let bytes = read_module(path)?;
        for dep in modinfo(&bytes, "depends")
            .split(',')
            .filter(|d| !d.is_empty())
        {
            visit(&dep.replace('-', "_"), by_name, seen, order)?;
        }
        order.push((format!("{name}.ko"), bytes));
        Ok(())
    }
    for w in wanted {
        visit(w, &by_name, &mut seen, &mut order)?;
    }
    let mut names = Vec::new();
    for (name, bytes) in order {
        fs::write(dest.join(&name), bytes)?;
        names.push(name);
    }
    Ok(names)
}

fn walk_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            walk_modules(&p, out)?;
        } else if let Some(n) = p.file_name().map(|n| n.to_string_lossy().into_owned()) {
            if let Some(stem) = n.strip_suffix(".ko").or_else(|| n.strip_suffix(".ko.xz")) {
                out.insert(stem.replace('-', "_"), p);
            }
        }
    }
    Ok(())
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("failed to run xz")?;
        if !out.status.success() {
            bail!("xz -dc {} failed", path.display());
        }
        return Ok(out.stdout);
    }
    Ok(fs::read(path)?)
}

/// A `.modinfo` value (`key=value\0` strings in the module).
fn modinfo(bytes: &[u8], key: &str) -> String {
    let needle = format!("\0{key}=");
    let n = needle.as_bytes();
    bytes
        .windows(n.len())
        .position(|w| w == n)
        .map(|i| {
            let rest = &bytes[i + n.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        })
        .unwrap_or_default()
}

/// One row of `nsmatrix kernels list`.
#[derive(Debug, Clone)]
pub struct KernelStatus {
    pub spec: KernelSpec,
    pub cached: Option<Kernel>,
}

/// Every catalog kernel and what the cache holds for it (no network).
pub fn list() -> Vec<KernelStatus> {
    Catalog::builtin()
        .kernels
        .into_iter()
        .map(|spec| KernelStatus {
            cached: cached(&spec.name),
            spec,
        })
        .collect()
}

/// `nsmatrix kernels list` as text.
pub fn render_list(rows: &[KernelStatus]) -> String {
    let mut s = String::new();
    for r in rows {
        let how = if r.spec.is_built() { "build" } else { "fetch" };
        match &r.cached {
            Some(k) => s.push_str(&format!(
                "{:<18} cached   {}  CONFIG_USER_NS={}  sysctls: {}\n{:<18}          {}\n",
                r.spec.name,
                k.facts.release,
                if k.facts.user_ns { "y" } else { "n" },
                if k.facts.sysctls.is_empty() {
                    "none".to_string()
                } else {
                    k.facts.sysctls.join(", ")
                },
                "",
                k.facts.origin,
            )),
            None => s.push_str(&format!(
                "{:<18} missing  ({how}: nsmatrix kernels {how} {})  {}\n",
                r.spec.name, r.spec.name, r.spec.description
            )),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_is_valid() {
        let c = Catalog::builtin();
        for n in [
            "debian-5.10",
            "debian-6.1",
            "debian-6.12",
            "nouserns-6.1",
            "synology-like-5.10",
        ] {
            c.get(n).unwrap();
        }
        assert!(c.get("nouserns-6.1").unwrap().is_built());
        assert!(c.get("synology-like-5.10").unwrap().is_built());
        assert!(c.get("nope").is_err());
        for k in &c.kernels {
            if let Some(f) = &k.fragment {
                assert!(FRAGMENTS.iter().any(|(p, _)| p == f), "{f} not compiled in");
            }
        }
    }

    #[test]
    fn facts_from_config() {
        let cfg = "CONFIG_SYSCTL=y\n# CONFIG_USER_NS is not set\n";
        let img = b"..max_user_namespaces\0..";
        assert_eq!(
            read_facts(cfg, img),
            (false, vec!["user.max_user_namespaces".to_string()])
        );
        let cfg = "CONFIG_SYSCTL=y\nCONFIG_USER_NS=y\n";
        let img = b"max_user_namespaces\0unprivileged_userns_clone\0";
        assert_eq!(read_facts(cfg, img).1.len(), 2);
    }

    #[test]
    fn fragment_check_reports_lost_options() {
        let frag = "CONFIG_A=y\n# CONFIG_B is not set\n";
        assert!(check_fragment(frag, "CONFIG_A=y\n").is_ok());
        let e = check_fragment(frag, "CONFIG_A=y\nCONFIG_B=y\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("CONFIG_B=n"), "{e}");
    }

    #[test]
    fn modinfo_reads_depends() {
        let b = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0name=virtio_pci\0";
        assert_eq!(modinfo(b, "depends"), "virtio,virtio_ring");
        assert_eq!(modinfo(b, "nope"), "");
    }
}
