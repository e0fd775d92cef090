//! A user's image for `nsmatrix signoff-image`: a Dockerfile built here without a registry (on
//! the bookworm base image nsmatrix imports, cached by content hash), and the user an image
//! runs as (its `USER`, resolved to a uid through the image's own `/etc/passwd`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, DownloadFromContainerOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::client::{DockerBackend, error_chain};
use super::images::Progress;
use crate::artifacts::rootfs::RootfsRecipe;

/// On every image `signoff-image` builds from a Dockerfile: the content hash it was built from.
pub(crate) const LABEL_SIGNOFF_BUILD: &str = "nsmatrix.signoff-build";

/// A Docker build of a user's Dockerfile may take many minutes (apt, npm): longer than the
/// client's usual request timeout.
const BUILD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The build-context directory a Dockerfile copies Codex's npm tarballs from: where build
/// containers cannot reach the npm registry (here a TLS-intercepting egress proxy whose CA they
/// do not trust), nsmatrix puts the registry's own tarballs there, verified against their
/// `dist.integrity`.
pub(crate) const NPM_DIR: &str = "nsmatrix-npm/";

/// The user an image runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUser {
    /// The image's `USER` as written (`user`, `1000:1000`, empty for root).
    pub name: String,
    pub uid: u32,
}

impl DockerBackend {
    /// Build `dockerfile` with its directory as the build context and `BASE` set to the base
    /// image nsmatrix imports from its bookworm root filesystem (no registry: `FROM ${BASE}`).
    /// The engine's default network is used, so `apt-get` and `npm install` reach their
    /// registries. The tag is `nsmatrix/signoff-<name>:<hash12>`, the hash covering the context
    /// and the base: a rebuild happens only when one of them changes.
    pub async fn build_user_dockerfile(
        &self,
        dockerfile: &Path,
        progress: Progress<'_>,
    ) -> Result<String> {
        let dir = dockerfile
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = dockerfile
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file", dockerfile.display()))?
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(dockerfile)
            .with_context(|| format!("failed to read the Dockerfile {}", dockerfile.display()))?;
        let rootfs = RootfsRecipe::builtin("bookworm").expect("the bookworm recipe is built in");
        let base = self.ensure_base(&rootfs, false, progress).await?;
        // A Dockerfile that copies `nsmatrix-npm/` gets the pinned Codex's npm tarballs there.
        let mut extra = Vec::new();
        if text.contains(NPM_DIR) {
            let v = crate::agent::PINNED_CODEX;
            progress(&format!(
                "putting Codex {v}'s npm tarballs (integrity-verified, cached) in the build context as {NPM_DIR}"
            ));
            let (launcher, platform) =
                tokio::task::spawn_blocking(move || crate::artifacts::npm::codex_npm_tarballs(v))
                    .await
                    .context("fetching the Codex npm tarballs panicked")??;
            extra.push((format!("{NPM_DIR}openai-codex-{v}.tgz"), launcher));
            extra.push((format!("{NPM_DIR}openai-codex-{v}-linux-x64.tgz"), platform));
        }
        let context = context_tar(dir, &extra)?;
        let mut h = Sha256::new();
        h.update(format!("signoff-build v1\0{file_name}\0{base}\0"));
        h.update(&context);
        let hash = hex::encode(h.finalize());
        let stem: String = file_name
            .trim_end_matches(".Dockerfile")
            .trim_end_matches(".dockerfile")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let tag = format!("nsmatrix/signoff-{stem}:{}", &hash[..12]);
        if self.image_exists(&tag).await? {
            progress(&format!("{} is built already: {tag}", dockerfile.display()));
            return Ok(tag);
        }
        progress(&format!(
            "building {} as {tag} (FROM {base}; network on for apt/npm)",
            dockerfile.display()
        ));
        let opts = BuildImageOptions {
            dockerfile: file_name.clone(),
            t: Some(tag.clone()),
            rm: true,
            forcerm: true,
            buildargs: Some(HashMap::from([("BASE".to_string(), base)])),
            labels: Some(HashMap::from([(
                LABEL_SIGNOFF_BUILD.to_string(),
                hash.clone(),
            )])),
            ..Default::default()
        };
        let docker = self.docker.clone().with_timeout(BUILD_TIMEOUT);
        let what = format!("{} ({tag})", dockerfile.display());
        self.build(&docker, opts, context, &what, Some(progress))
            .await?;
        Ok(tag)
    }

    /// The user `image` runs as: its `USER` (empty: root), a name resolved through the image's
    /// own `/etc/passwd` (read from a container that is created, never started, and removed).
    pub async fn image_user(&self, image: &str) -> Result<ImageUser> {
        let info = self
            .docker
            .inspect_image(image)
            .await
            .with_context(|| format!("failed to inspect image {image:?}"))?;
        let name = info
            .config
            .and_then(|c| c.user)
            .unwrap_or_default()
            .trim()
            .to_string();
        let user_part = name.split(':').next().unwrap_or("").to_string();
        if user_part.is_empty() {
            return Ok(ImageUser { name, uid: 0 });
        }
        if let Ok(uid) = user_part.parse::<u32>() {
            return Ok(ImageUser { name, uid });
        }
        let passwd = self.read_image_file(image, "/etc/passwd").await.with_context(|| {
            format!("image {image:?} runs as user {user_part:?}, whose uid is looked up in its /etc/passwd")
        })?;
        let uid = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[0] == user_part)
            .and_then(|f| f[2].parse::<u32>().ok())
            .ok_or_else(|| {
                anyhow!("image {image:?} runs as user {user_part:?}, which its /etc/passwd does not name")
            })?;
        Ok(ImageUser { name, uid })
    }

    /// One file of an image, from a container created for it (never started) and removed.
    async fn read_image_file(&self, image: &str, path: &str) -> Result<String> {
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            // Never started: a command is only needed by images that have none.
            cmd: Some(vec!["/nonexistent".into()]),
            network_disabled: Some(true),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .with_context(|| format!("failed to create a container of {image:?}"))?;
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self.docker.download_from_container(&created.id, Some(opts));
        let mut tar_bytes = Vec::new();
        let mut failed = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => tar_bytes.extend_from_slice(&b),
                Err(e) => {
                    failed = Some(error_chain(&e));
                    break;
                }
            }
        }
        let rm = RemoveContainerOptionsBuilder::default().force(true).build();
        let _ = self.docker.remove_container(&created.id, Some(rm)).await;
        if let Some(e) = failed {
            bail!("failed to read {path} from image {image:?}: {e}");
        }
        let mut ar = tar::Archive::new(&tar_bytes[..]);
        if let Some(entry) = ar.entries()?.next() {
            let mut entry = entry?;
            let mut s = String::new();
            std::io::Read::read_to_string(&mut entry, &mut s)?;
            return Ok(s);
        }
        bail!("image {image:?} has no {path}")
    }
}

/// The build context: every file under `dir` (sorted, owners and times zeroed, so the same
/// files give the same bytes and the same hash).
fn context_tar(dir: &Path, extra: &[(String, std::path::PathBuf)]) -> Result<Vec<u8>> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    let mut files: Vec<(String, std::path::PathBuf)> = files
        .into_iter()
        .map(|r| (r.clone(), dir.join(r)))
        .collect();
    files.extend(extra.iter().cloned());
    files.sort();
    let mut b = tar::Builder::new(Vec::new());
    for (rel, p) in files {
        let data = std::fs::read(&p).with_context(|| format!("failed to read {}", p.display()))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p)?.permissions());
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode & 0o7777);
        header.set_mtime(0);
        header.set_cksum();
        b.append_data(&mut header, &rel, &data[..])?;
    }
    Ok(b.into_inner()?)
}

/// Files under `dir`, relative to `root`; more than 256 MB in total is refused (a Dockerfile
/// beside a build tree: give it a directory of its own).
fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    const LIMIT: u64 = 256 << 20;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("failed to read {}", d.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                total += e.metadata()?.len();
                if total > LIMIT {
                    bail!(
                        "the build context {} holds more than 256 MB: put the Dockerfile in a directory of its own",
                        root.display()
                    );
                }
                let rel = e.path().strip_prefix(root)?.to_string_lossy().into_owned();
                out.push(rel);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_tar_is_the_same_for_the_same_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.Dockerfile"), "FROM x\n").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), "1").unwrap();
        let a = context_tar(d.path(), &[]).unwrap();
        assert_eq!(a, context_tar(d.path(), &[]).unwrap());
        std::fs::write(d.path().join("sub/f"), "2").unwrap();
        assert_ne!(a, context_tar(d.path(), &[]).unwrap());
        let names: Vec<String> = tar::Archive::new(&a[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.Dockerfile", "sub/f"]);
    }
}
