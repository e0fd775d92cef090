//! [`codex_package`]: the Codex CLI from npm (`@openai/codex@<version>-linux-x64`), fetched
//! once, verified against the registry's `dist.integrity`, and unpacked into the cache.
//!
//! Layout: `cache_dir()/npm/openai-codex-<version>-linux-x64.tgz` (the verified tarball) and
//! `cache_dir()/npm/openai-codex-<version>-linux-x64/` holding `codex`, `bwrap` and a
//! `complete` marker naming the tarball's integrity and the files' sizes. A missing or
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
    /// The static `bwrap` Codex falls back to when none is on PATH.
    pub bwrap: PathBuf,
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
        bwrap: dir.join("codex-resources").join("bwrap"),
        tarball: base.join(format!("{stem}.tgz")),
    };
    let marker = dir.join("complete");
    if let Ok(text) = fs::read_to_string(&marker)
        && marker_matches(&text, &pkg)
    {
        return Ok(pkg);
    }

    let agent = http_agent()?;
    let (tarball_url, integrity) = resolve(&agent, registry, version)?;
    let sum = Checksum::Sri(integrity.clone());
    // Fetched once; a cached tarball that no longer matches is fetched again.
    fetch_verified(&tarball_url, &pkg.tarball, &sum)?;
    fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    fs::remove_file(&marker).ok();
    unpack(&pkg.tarball, &pkg)
        .with_context(|| format!("failed to unpack {}", pkg.tarball.display()))?;
    let sizes = [&pkg.codex, &pkg.bwrap]
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()))
        .collect::<io::Result<Vec<_>>>()?;
    fs::write(
        &marker,
        format!("{integrity}\n{}\n{}\n", sizes[0], sizes[1]),
    )
    .with_context(|| format!("failed to write {}", marker.display()))?;
    Ok(pkg)
}

/// The marker holds the integrity and both sizes; a truncated or replaced binary fails it.
fn marker_matches(text: &str, pkg: &CodexPackage) -> bool {
    let mut lines = text.lines();
    let _integrity = lines.next();
    [&pkg.codex, &pkg.bwrap].iter().all(|p| {
        let want = lines.next().and_then(|l| l.parse::<u64>().ok());
        let got = fs::metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        want.is_some() && want == got
    })
}

/// The tarball URL and `dist.integrity` of one version, from the registry's metadata.
fn resolve(agent: &ureq::Agent, registry: &str, version: &str) -> Result<(String, String)> {
    let url = format!("{registry}/@openai%2fcodex/{version}-linux-x64");
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

/// Extract `vendor/<triple>/bin/codex` and `vendor/<triple>/codex-resources/bwrap` (an
/// x86_64 Linux triple), wherever in the package they are.
fn unpack(tarball: &Path, pkg: &CodexPackage) -> Result<()> {
    let f = fs::File::open(tarball)?;
    let mut archive = tar::Archive::new(GzDecoder::new(io::BufReader::new(f)));
    let (mut got_codex, mut got_bwrap) = (false, false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let dest = if path.ends_with("/bin/codex") && path.contains("x86_64") {
            got_codex = true;
            &pkg.codex
        } else if path.ends_with("/codex-resources/bwrap") && path.contains("x86_64") {
            got_bwrap = true;
            &pkg.bwrap
        } else {
            continue;
        };
        extract_to(&mut entry, dest)?;
        if got_codex && got_bwrap {
            return Ok(());
        }
    }
    bail!(
        "the package holds no {}",
        if got_codex { "bwrap" } else { "codex binary" }
    )
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
