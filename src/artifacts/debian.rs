//! [`Mirror`] and [`PackageIndex`]: a small Debian mirror client. A suite's `Packages` index is
//! fetched over plain HTTP (its SHA-256 checked against the suite's `InRelease`), packages are
//! looked up by name or glob, and a `.deb` is fetched into the cache with the SHA-256 from the
//! index verified. `apt` is not needed; `dpkg-deb` extracts (see [`extract_deb`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use super::cache::{Checksum, cache_dir, download, fetch_verified};

/// The mirror used when `NSMATRIX_DEBIAN_MIRROR` is not set.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// How long a cached `InRelease` is trusted before it is fetched again (offline runs fall back
/// to the cached one whatever its age).
const RELEASE_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub base: String,
}

impl Default for Mirror {
    fn default() -> Self {
        Mirror::from_env()
    }
}

impl Mirror {
    /// `$NSMATRIX_DEBIAN_MIRROR`, else [`DEFAULT_MIRROR`].
    pub fn from_env() -> Mirror {
        let base = std::env::var("NSMATRIX_DEBIAN_MIRROR")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_MIRROR.to_string());
        Mirror {
            base: base.trim_end_matches('/').to_string(),
        }
    }

    fn cache_root(&self) -> PathBuf {
        cache_dir().join("debian")
    }

    /// Load `dists/SUITE/main/binary-amd64/Packages.gz`, verified against `InRelease`, cached.
    pub fn index(&self, suite: &str) -> Result<PackageIndex> {
        let dir = self.cache_root().join("dists").join(suite);
        fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        let release = dir.join("InRelease");
        let _lock = super::cache::lock(&release)?;
        let fresh = fs::metadata(&release)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < RELEASE_MAX_AGE);
        if !fresh {
            let tmp = dir.join("InRelease.partial");
            match download(&format!("{}/dists/{suite}/InRelease", self.base), &tmp) {
                Ok(()) => fs::rename(&tmp, &release)?,
                Err(e) if release.exists() => {
                    eprintln!("nsmatrix: using the cached index of {suite}: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
        let text = fs::read_to_string(&release)
            .with_context(|| format!("failed to read {}", release.display()))?;
        let want = release_sha256(&text, "main/binary-amd64/Packages.gz")
            .ok_or_else(|| anyhow!("{suite}'s InRelease lists no main/binary-amd64/Packages.gz"))?;
        let gz = dir.join(format!("Packages-{}.gz", &want[..16]));
        fetch_verified(
            &format!("{}/dists/{suite}/main/binary-amd64/Packages.gz", self.base),
            &gz,
            &Checksum::Sha256Hex(want),
        )?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(fs::File::open(&gz)?)
            .read_to_string(&mut text)
            .with_context(|| format!("failed to decompress {}", gz.display()))?;
        Ok(PackageIndex::parse(self.clone(), suite, &text))
    }
}

/// The SHA-256 an `InRelease` gives for one of its files.
fn release_sha256(release: &str, file: &str) -> Option<String> {
    let mut in_sha = false;
    for line in release.lines() {
        if !line.starts_with(' ') {
            in_sha = line.trim_end() == "SHA256:";
            continue;
        }
        if in_sha {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 3 && f[2] == file {
                return Some(f[0].to_ascii_lowercase());
            }
        }
    }
    None
}

/// One binary package of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub filename: String,
    pub sha256: String,
    pub size: u64,
    /// `Pre-Depends` and `Depends`, first alternative of each, versions dropped.
    pub depends: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PackageIndex {
    pub mirror: Mirror,
    pub suite: String,
    /// Every version of every package in the index, by name.
    packages: BTreeMap<String, Vec<Package>>,
}

impl PackageIndex {
    pub fn parse(mirror: Mirror, suite: &str, text: &str) -> PackageIndex {
        let mut packages: BTreeMap<String, Vec<Package>> = BTreeMap::new();
        for para in text.split("\n\n") {
            let mut fields: BTreeMap<&str, String> = BTreeMap::new();
            let mut last = None;
            for line in para.lines() {
                if line.starts_with(' ') || line.starts_with('\t') {
                    if let Some(k) = last {
                        fields.entry(k).or_default().push_str(line);
                    }
                } else if let Some((k, v)) = line.split_once(':') {
                    fields.insert(k, v.trim().to_string());
                    last = Some(k);
                }
            }
            let (Some(name), Some(version), Some(filename), Some(sha256)) = (
                fields.get("Package"),
                fields.get("Version"),
                fields.get("Filename"),
                fields.get("SHA256"),
            ) else {
                continue;
            };
            let mut depends = Vec::new();
            for key in ["Pre-Depends", "Depends"] {
                if let Some(d) = fields.get(key) {
                    depends.extend(parse_depends(d));
                }
            }
            packages.entry(name.clone()).or_default().push(Package {
                name: name.clone(),
                version: version.clone(),
                filename: filename.clone(),
                sha256: sha256.clone(),
                size: fields.get("Size").and_then(|s| s.parse().ok()).unwrap_or(0),
                depends,
            });
        }
        PackageIndex {
            mirror,
            suite: suite.to_string(),
            packages,
        }
    }

    /// The newest version of a package.
    pub fn get(&self, name: &str) -> Option<&Package> {
        self.packages
            .get(name)?
            .iter()
            .max_by(|a, b| compare_versions(&a.version, &b.version))
    }

    /// The newest package whose name matches `pattern` (`*` matches any run of characters),
    /// preferring the newest version, then the longest ABI name (`5.10.0-32` over `5.10.0-9`).
    pub fn find(&self, pattern: &str) -> Option<&Package> {
        self.packages
            .keys()
            .filter(|n| glob_match(pattern, n))
            .filter_map(|n| self.get(n))
            .max_by(|a, b| {
                compare_versions(&a.version, &b.version)
                    .then_with(|| compare_versions(&a.name, &b.name))
            })
    }

    /// `names` and everything they depend on (first alternatives, virtual packages skipped).
    pub fn closure(&self, names: &[&str], exclude: &[&str]) -> Result<Vec<&Package>> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut out = Vec::new();
        while let Some(n) = todo.pop() {
            if exclude.contains(&n.as_str()) || !seen.insert(n.clone()) {
                continue;
            }
            match self.get(&n) {
                Some(p) => {
                    todo.extend(p.depends.iter().cloned());
                    out.push(p);
                }
                None if names.contains(&n.as_str()) => {
                    bail!("package {n} is not in {}'s index", self.suite)
                }
                // A virtual package or an alternative that is provided elsewhere.
                None => {}
            }
        }
        Ok(out)
    }

    /// The `.deb`, fetched into the cache unless there already, its SHA-256 verified.
    pub fn fetch(&self, pkg: &Package) -> Result<PathBuf> {
        let base = pkg.filename.rsplit('/').next().unwrap_or(&pkg.filename);
        let dest = self
            .mirror
            .cache_root()
            .join("pool")
            .join(&pkg.sha256[..2])
            .join(base);
        fetch_verified(
            &format!("{}/{}", self.mirror.base, pkg.filename),
            &dest,
            &Checksum::Sha256Hex(pkg.sha256.clone()),
        )
        .with_context(|| {
            format!(
                "failed to fetch {} {} from {}",
                pkg.name, pkg.version, self.suite
            )
        })
    }
}

fn parse_depends(s: &str) -> Vec<String> {
    s.split(',')
        .filter_map(|alt| {
            let first = alt.split('|').next()?.trim();
            let name = first.split([' ', '(', ':']).next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// `*` matches any run of characters other than `-`, so `linux-image-5.10.0-*-amd64` names the
/// generic flavour and never `...-32-cloud-amd64`.
fn glob_match(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .take_while(|&i| i == 0 || rest.as_bytes()[i - 1] != b'-')
                .any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

/// dpkg's version ordering (epoch, upstream, revision; `~` sorts before everything).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u, r),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

fn verrevcmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let mut first_diff = 0;
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ac = order(a.get(i).copied().filter(|c| !c.is_ascii_digit()));
            let bc = order(b.get(j).copied().filter(|c| !c.is_ascii_digit()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == 0 {
                first_diff = a[i] as i32 - b[j] as i32;
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return std::cmp::Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return std::cmp::Ordering::Less;
        }
        if first_diff != 0 {
            return first_diff.cmp(&0);
        }
    }
    std::cmp::Ordering::Equal
}

/// Extract a `.deb`'s data into `dest` (the one place that runs `dpkg-deb`).
pub fn extract_deb(deb: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("failed to create {}", dest.display()))?;
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(dest)
        .output()
        .context("failed to run dpkg-deb (install the dpkg package)")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb -x {} failed: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    #[test]
    fn versions_order_like_dpkg() {
        for (a, b, o) in [
            ("1.0", "1.0", Equal),
            ("1.0-1", "1.0-2", Less),
            ("1:1.0", "2.0", Greater),
            ("1.0~rc1", "1.0", Less),
            ("6.1.176-1", "6.1.170-3", Greater),
            ("0.12.0-1~deb13u1", "0.12.0-1", Less),
            ("5.10.0-32", "5.10.0-9", Greater),
            ("1.0a", "1.0", Greater),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
        }
    }

    #[test]
    fn index_parse_find_and_closure() {
        let text = "Package: linux-image-5.10.0-9-amd64\nVersion: 5.10.70-1\nFilename: pool/a.deb\nSHA256: aa\n\n\
Package: linux-image-5.10.0-32-amd64\nVersion: 5.10.223-1\nFilename: pool/b.deb\nSHA256: bb\nDepends: kmod, linux-base (>= 4.3~), initramfs-tools | linux-initramfs-tool\n\n\
Package: kmod\nVersion: 28-1\nFilename: pool/k.deb\nSHA256: cc\n";
        let idx = PackageIndex::parse(
            Mirror {
                base: "http://m".into(),
            },
            "bullseye",
            text,
        );
        let k = idx.find("linux-image-5.10.0-*-amd64").unwrap();
        assert_eq!(k.name, "linux-image-5.10.0-32-amd64");
        assert_eq!(k.depends, ["kmod", "linux-base", "initramfs-tools"]);
        let c = idx.closure(&["linux-image-5.10.0-32-amd64"], &[]).unwrap();
        assert_eq!(c.len(), 2);
        assert!(idx.closure(&["nope"], &[]).is_err());
        assert!(glob_match(
            "linux-image-6.12.*+deb13-amd64",
            "linux-image-6.12.117+deb13-amd64"
        ));
        assert!(!glob_match(
            "linux-image-5.10.0-*-amd64",
            "linux-image-5.10.0-32-cloud-amd64"
        ));
    }

    #[test]
    fn release_lookup() {
        let r = "MD5Sum:\n 00 1 main/binary-amd64/Packages.gz\nSHA256:\n AB 12 main/binary-amd64/Packages.gz\n";
        assert_eq!(
            release_sha256(r, "main/binary-amd64/Packages.gz").as_deref(),
            Some("ab")
        );
    }
}
