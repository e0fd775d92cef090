//! [`codex_package`]: the Codex CLI from npm (`@openai/codex@<version>-linux-x64`), fetched
//! once, verified against the registry's `dist.integrity`, and unpacked into the cache.
//!
//! Layout: `cache_dir()/npm/openai-codex-<version>-linux-x64.tgz` (the verified tarball) and
//! `cache_dir()/npm/openai-codex-<version>-linux-x64/` holding `bin/codex`, the bundled
//! `codex-resources/bwrap` when the release has one (0.129.0 and later), and a `complete`
//! marker naming the tarball's integrity and the files' sizes. A missing or
//! mismatching marker or file makes the files be unpacked again from the tarball, which
//! `fetch_verified` itself re-downloads if it no longer matches its integrity.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::read::GzDecoder;

use super::cache::{Checksum, cache_dir, fetch_verified, http_agent};

/// The registry, unless `$NSMATRIX_NPM_REGISTRY` names another (a mirror).
pub(crate) const DEFAULT_REGISTRY: &str = "https://registry.npmjs.org";

/// An unpacked Codex CLI release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodexPackage {
    pub version: String,
    /// The static `codex` binary. A symlink to it named `apply_patch` is Codex's apply_patch.
    pub codex: PathBuf,
    /// The static `bwrap` Codex falls back to when none is on PATH; `None` for releases
    /// without a bundled one (before 0.129.0 the package holds only `codex`).
    pub bwrap: Option<PathBuf>,
    /// The verified tarball it came from.
    pub tarball: PathBuf,
}

/// Fetch (or reuse from the cache) `@openai/codex@<version>-linux-x64` and return the paths
/// of its `codex` and `bwrap` binaries.
pub fn codex_package(version: &str) -> Result<CodexPackage> {
    // Tests fetch from several threads at once; one fetch per process is enough, and other
    // processes only race on renames of their own uniquely named partial files.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let registry = std::env::var("NSMATRIX_NPM_REGISTRY")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_REGISTRY.to_string());
    let registry = registry.trim_end_matches('/');
    let base = cache_dir().join("npm");
    let stem = format!("openai-codex-{version}-linux-x64");
    let dir = base.join(&stem);
    let pkg = CodexPackage {
        version: version.to_string(),
        // The package's own layout: Codex finds its bundled bwrap at
        // `<dir of the codex binary>/../codex-resources/bwrap`.
        codex: dir.join("bin").join("codex"),
        bwrap: None,
        tarball: base.join(format!("{stem}.tgz")),
    };
    let bundled = dir.join("codex-resources").join("bwrap");
    let marker = dir.join("complete");
    if let Ok(text) = fs::read_to_string(&marker)
        && let Some(bwrap) = marker_matches(&text, &pkg.codex, &bundled)
    {
        return Ok(CodexPackage { bwrap, ..pkg });
    }

    let agent = http_agent()?;
    let (tarball_url, integrity) = resolve(&agent, registry, version)?;
    let sum = Checksum::Sri(integrity.clone());
    // Fetched once; a cached tarball that no longer matches is fetched again.
    fetch_verified(&tarball_url, &pkg.tarball, &sum)?;
    fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    fs::remove_file(&marker).ok();
    fs::remove_file(&bundled).ok();
    let has_bwrap = unpack(&pkg.tarball, &pkg.codex, &bundled)
        .with_context(|| format!("failed to unpack {}", pkg.tarball.display()))?;
    let size = |p: &Path| fs::metadata(p).map(|m| m.len());
    // The second size is `-` for a release without a bundled bwrap.
    let bwrap_size = if has_bwrap {
        size(&bundled)?.to_string()
    } else {
        "-".to_string()
    };
    fs::write(
        &marker,
        format!("{integrity}\n{}\n{bwrap_size}\n", size(&pkg.codex)?),
    )
    .with_context(|| format!("failed to write {}", marker.display()))?;
    Ok(CodexPackage {
        bwrap: has_bwrap.then_some(bundled),
        ..pkg
    })
}

/// The marker holds the integrity and both sizes (`-` for no bundled bwrap); a truncated or
/// replaced binary fails it. `Some(bwrap)` when it matches.
fn marker_matches(text: &str, codex: &Path, bundled: &Path) -> Option<Option<PathBuf>> {
    let mut lines = text.lines();
    let _integrity = lines.next();
    let size_of = |p: &Path| {
        fs::metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    };
    let want_codex = lines.next().and_then(|l| l.parse::<u64>().ok());
    if want_codex.is_none() || want_codex != size_of(codex) {
        return None;
    }
    match lines.next()? {
        "-" => Some(None),
        l => {
            let want = l.parse::<u64>().ok();
            (want == size_of(bundled)).then(|| Some(bundled.to_path_buf()))
        }
    }
}

/// The npm tarballs of a Codex release as the registry serves them, integrity-verified and
/// cached: the `@openai/codex` launcher package and its linux-x64 package (its optional
/// dependency `@openai/codex-linux-x64`). Image builds that cannot reach the registry
/// themselves install Codex from these (`signoff-image` puts them in the build context).
pub fn codex_npm_tarballs(version: &str) -> Result<(PathBuf, PathBuf)> {
    let platform = codex_package(version)?.tarball;
    let registry = std::env::var("NSMATRIX_NPM_REGISTRY")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_REGISTRY.to_string());
    let launcher = cache_dir()
        .join("npm")
        .join(format!("openai-codex-{version}.tgz"));
    let agent = http_agent()?;
    let (url, integrity) = resolve_spec(&agent, registry.trim_end_matches('/'), version)?;
    fetch_verified(&url, &launcher, &Checksum::Sri(integrity))?;
    Ok((launcher, platform))
}

/// The tarball URL and `dist.integrity` of one version, from the registry's metadata.
fn resolve(agent: &ureq::Agent, registry: &str, version: &str) -> Result<(String, String)> {
    resolve_spec(agent, registry, &format!("{version}-linux-x64"))
}

/// The same for `@openai/codex@<spec>` (a version as the registry names it).
fn resolve_spec(agent: &ureq::Agent, registry: &str, version: &str) -> Result<(String, String)> {
    let url = format!("{registry}/@openai%2fcodex/{version}");
    let body = agent
        .get(&url)
        .call()
        .with_context(|| format!("failed to fetch {url}"))?
        .into_body()
        .read_to_string()
        .with_context(|| format!("failed to read {url}"))?;
    let meta: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("failed to parse {url}"))?;
    let dist = &meta["dist"];
    let (Some(tarball), Some(integrity)) = (dist["tarball"].as_str(), dist["integrity"].as_str())
    else {
        bail!("{url} has no dist.tarball and dist.integrity");
    };
    Ok((tarball.to_string(), integrity.to_string()))
}

/// Extract the codex binary (`vendor/<triple>/bin/codex`, or `vendor/<triple>/codex/codex`
/// before 0.13x) and `vendor/<triple>/codex-resources/bwrap` when there is one (an x86_64
/// Linux triple), wherever in the package they are. Returns whether a bwrap was there.
fn unpack(tarball: &Path, codex: &Path, bwrap: &Path) -> Result<bool> {
    let f = fs::File::open(tarball)?;
    let mut archive = tar::Archive::new(GzDecoder::new(io::BufReader::new(f)));
    let (mut got_codex, mut got_bwrap) = (false, false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if !path.contains("x86_64") {
            continue;
        }
        let dest = if path.ends_with("/bin/codex") || path.ends_with("/codex/codex") {
            got_codex = true;
            codex
        } else if path.ends_with("/codex-resources/bwrap") {
            got_bwrap = true;
            bwrap
        } else {
            continue;
        };
        extract_to(&mut entry, dest)?;
        if got_codex && got_bwrap {
            break;
        }
    }
    if !got_codex {
        bail!("the package holds no x86_64 codex binary");
    }
    Ok(got_bwrap)
}

fn extract_to(entry: &mut impl Read, dest: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let tmp = partial(dest);
    let mut out =
        fs::File::create(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
    io::copy(entry, &mut out).with_context(|| format!("failed to write {}", tmp.display()))?;
    drop(out);
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, dest)
        .with_context(|| format!("failed to move {} into place", dest.display()))?;
    Ok(())
}

/// A temporary name beside `dest`, unique to this process.
fn partial(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    dest.with_file_name(name)
}

/// Whether `version`'s package is unpacked in the cache already (its marker is there).
pub fn is_cached(version: &str) -> bool {
    cache_dir()
        .join("npm")
        .join(format!("openai-codex-{version}-linux-x64"))
        .join("complete")
        .is_file()
}

/// How long the registry's version list is reused before it is fetched again.
const VERSIONS_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// The Codex releases that have a linux-x64 build, from the registry's version list
/// (fetched at most once an hour, kept in `cache_dir()/npm/codex-versions.txt`).
pub fn linux_x64_versions() -> Result<Vec<String>> {
    let path = cache_dir().join("npm").join("codex-versions.txt");
    let fresh = fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < VERSIONS_TTL);
    if fresh && let Ok(text) = fs::read_to_string(&path) {
        return Ok(text.lines().map(str::to_string).collect());
    }
    let registry = std::env::var("NSMATRIX_NPM_REGISTRY")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_REGISTRY.to_string());
    let url = format!("{}/@openai%2fcodex", registry.trim_end_matches('/'));
    let body = http_agent()?
        .get(&url)
        // The abbreviated document: versions without their READMEs.
        .header("Accept", "application/vnd.npm.install-v1+json")
        .call()
        .with_context(|| format!("failed to fetch {url}"))?
        .into_body()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .with_context(|| format!("failed to read {url}"))?;
    let meta: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("failed to parse {url}"))?;
    let Some(all) = meta["versions"].as_object() else {
        bail!("{url} lists no versions");
    };
    let mut linux: Vec<String> = all
        .keys()
        .filter_map(|k| k.strip_suffix("-linux-x64"))
        .map(str::to_string)
        .collect();
    linux.sort_by_key(|v| version_key(v));
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).ok();
    }
    let tmp = partial(&path);
    if fs::write(&tmp, linux.join("\n")).is_ok() {
        fs::rename(&tmp, &path).ok();
    }
    Ok(linux)
}

/// Numeric parts first (`0.116.0` < `0.128.0`), then the text (pre-releases).
fn version_key(v: &str) -> (Vec<u64>, String) {
    let (core, pre) = v.split_once('-').unwrap_or((v, ""));
    (
        core.split('.').map(|p| p.parse().unwrap_or(0)).collect(),
        pre.to_string(),
    )
}

/// The releases of `known` (sorted) nearest to `wanted`: the closest below and above.
pub fn nearest_versions(wanted: &str, known: &[String]) -> Vec<String> {
    let key = version_key(wanted);
    let stable = known.iter().filter(|v| !v.contains('-'));
    let below = stable.clone().rfind(|v| version_key(v) < key);
    let above = stable.clone().find(|v| version_key(v) > key);
    below.into_iter().chain(above).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_knows_packages_without_a_bundled_bwrap() {
        let d = tempfile::tempdir().unwrap();
        let codex = d.path().join("codex");
        let bwrap = d.path().join("bwrap");
        fs::write(&codex, b"12345").unwrap();
        assert_eq!(
            marker_matches("sha512-x\n5\n-\n", &codex, &bwrap),
            Some(None)
        );
        // A bundled bwrap recorded but missing, or a changed codex, means unpack again.
        assert_eq!(marker_matches("sha512-x\n5\n3\n", &codex, &bwrap), None);
        assert_eq!(marker_matches("sha512-x\n4\n-\n", &codex, &bwrap), None);
        fs::write(&bwrap, b"abc").unwrap();
        assert_eq!(
            marker_matches("sha512-x\n5\n3\n", &codex, &bwrap),
            Some(Some(bwrap.clone()))
        );
    }

    #[test]
    fn nearest_versions_bracket_the_missing_one() {
        let known: Vec<String> = [
            "0.113.0",
            "0.115.0",
            "0.116.0-alpha.1",
            "0.116.0",
            "0.171.0",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(nearest_versions("0.114.0", &known), ["0.113.0", "0.115.0"]);
        assert_eq!(nearest_versions("0.170.0", &known), ["0.116.0", "0.171.0"]);
        assert_eq!(nearest_versions("9.0.0", &known), ["0.171.0"]);
        assert_eq!(nearest_versions("0.1.0", &known), ["0.113.0"]);
    }
}
