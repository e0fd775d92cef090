//! Images without a registry: import a root filesystem as a base image, build the catalog's
//! Dockerfiles on it, list and prune what nsmatrix made ([`DockerBackend::ensure_image`]).

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use bollard::query_parameters::{
    BuildImageOptions, CreateImageOptions, ListImagesOptions, RemoveImageOptions,
};
use futures_util::StreamExt;

use super::client::{DockerBackend, error_chain};
use crate::artifacts::images::{
    ImageRecipe, LABEL_IMAGE, LABEL_RECIPE, REPO_PREFIX, base_hash, base_tag,
};
use crate::artifacts::rootfs::{RootfsRecipe, ensure_rootfs_tar};

/// Serialises image imports and builds in this process: concurrent batches (or backends) on
/// one image build it once. Across processes the root filesystem's file lock does the same.
static IMAGE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One image nsmatrix made, as `images list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Catalog name (`bookworm-suid`) or `rootfs-NAME` for a base image.
    pub name: String,
    /// `nsmatrix/NAME:HASH12` (empty when the image lost its tag).
    pub tag: String,
    pub id: String,
    pub size_bytes: u64,
    pub created_unix: i64,
    /// Built from the recipe compiled into this binary; stale images are what `prune` removes.
    pub current: bool,
}

/// How `images build` reports progress: one line per step.
pub(crate) type Progress<'a> = &'a mut (dyn FnMut(&str) + Send);

impl DockerBackend {
    /// The image reference to run for `name`: a catalog image is built (or found by its recipe
    /// tag) first; anything else must already exist locally (there is no registry to pull from).
    pub async fn ensure_image(&self, name: &str) -> Result<String> {
        if ImageRecipe::builtin(name).is_some() {
            return self.ensure_recipe_image(name).await;
        }
        self.ensure_local_image(name).await
    }

    /// Build (or find) a catalog image; its reference is `nsmatrix/NAME:HASH12`.
    pub(crate) async fn ensure_recipe_image(&self, name: &str) -> Result<String> {
        let recipe = ImageRecipe::builtin(name).ok_or_else(|| {
            anyhow!("no image {name:?} in the catalog (vm-images/docker/images.toml)")
        })?;
        self.build_recipe(&recipe, false, &mut |_| {}).await?;
        Ok(recipe.tag())
    }

    /// An image that must already be in the engine (there is no registry to pull from).
    pub(crate) async fn ensure_local_image(&self, name: &str) -> Result<String> {
        match self.docker.inspect_image(name).await {
            Ok(_) => Ok(name.to_string()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                let known: Vec<String> =
                    ImageRecipe::catalog().into_iter().map(|r| r.name).collect();
                bail!(
                    "image {name:?} is neither in nsmatrix's catalog ({}) nor present in the engine (no registry is used: load or build it first)",
                    known.join(", ")
                )
            }
            Err(e) => Err(e).with_context(|| format!("failed to inspect image {name:?}")),
        }
    }

    /// `images build [NAME]`: build the named catalog images (all when `names` is empty).
    /// `force` rebuilds even when an image of the same recipe exists.
    pub async fn build_images(
        &self,
        names: &[String],
        force: bool,
        progress: Progress<'_>,
    ) -> Result<Vec<String>> {
        let catalog = ImageRecipe::catalog();
        let chosen: Vec<&ImageRecipe> = if names.is_empty() {
            catalog.iter().collect()
        } else {
            names
                .iter()
                .map(|n| {
                    catalog.iter().find(|r| &r.name == n).ok_or_else(|| {
                        anyhow!("no image {n:?} in the catalog (vm-images/docker/images.toml)")
                    })
                })
                .collect::<Result<_>>()?
        };
        let mut tags = Vec::new();
        for r in chosen {
            self.build_recipe(r, force, progress).await?;
            tags.push(r.tag());
        }
        Ok(tags)
    }

    async fn build_recipe(
        &self,
        recipe: &ImageRecipe,
        force: bool,
        progress: Progress<'_>,
    ) -> Result<()> {
        let _guard = IMAGE_LOCK.lock().await;
        let tag = recipe.tag();
        if !force && self.image_exists(&tag).await? {
            return Ok(());
        }
        let base = self.ensure_base(&recipe.rootfs, force, progress).await?;
        progress(&format!("building {tag} from {base}"));
        let opts = BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(tag.clone()),
            rm: true,
            forcerm: true,
            nocache: force,
            // The Dockerfiles need nothing from the network.
            networkmode: Some("none".into()),
            buildargs: Some(HashMap::from([("BASE".to_string(), base)])),
            labels: Some(HashMap::from([
                (LABEL_IMAGE.to_string(), recipe.name.clone()),
                (LABEL_RECIPE.to_string(), recipe.hash()),
            ])),
            ..Default::default()
        };
        let context = recipe.build_context()?;
        self.build(&self.docker, opts, context, &format!("image {tag}"), None)
            .await
    }

    /// Run one image build (`opts` names the tag) on `docker` from a tar `context`, following
    /// its output: `Step` lines go to `progress` when given; an error names `what` with the
    /// build log's tail, and so does a build that ends without its image.
    pub(crate) async fn build(
        &self,
        docker: &bollard::Docker,
        opts: BuildImageOptions,
        context: Vec<u8>,
        what: &str,
        mut progress: Option<Progress<'_>>,
    ) -> Result<()> {
        let tag = opts.t.clone().unwrap_or_default();
        let mut stream = docker.build_image(opts, None, Some(bollard::body_full(context.into())));
        let mut log = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        bail!(
                            "failed to build {what}: {e}\n{}",
                            crate::text::tail_lines(&log, 15)
                        );
                    }
                    if let Some(s) = info.stream {
                        if let Some(p) = progress.as_mut()
                            && s.starts_with("Step ")
                        {
                            p(s.trim_end());
                        }
                        log.push_str(&s);
                    }
                }
                Err(e) => bail!(
                    "failed to build {what}: {}\n{}",
                    error_chain(&e),
                    crate::text::tail_lines(&log, 15)
                ),
            }
        }
        if !self.image_exists(&tag).await? {
            bail!(
                "building {what} ended without an image:\n{}",
                crate::text::tail_lines(&log, 15)
            );
        }
        Ok(())
    }

    /// Import the root filesystem as `nsmatrix/rootfs-NAME:HASH12` unless it is there.
    pub(crate) async fn ensure_base(
        &self,
        rootfs: &RootfsRecipe,
        force: bool,
        progress: Progress<'_>,
    ) -> Result<String> {
        let tag = base_tag(rootfs);
        if !force && self.image_exists(&tag).await? {
            return Ok(tag);
        }
        progress(&format!(
            "building root filesystem {:?} (debootstrap {})",
            rootfs.name, rootfs.suite
        ));
        let r = rootfs.clone();
        let tarball = tokio::task::spawn_blocking(move || ensure_rootfs_tar(&r))
            .await
            .context("root filesystem build panicked")??;
        progress(&format!("importing {} as {tag}", tarball.display()));
        let (repo, version) = tag.rsplit_once(':').expect("base tags have a version");
        let opts = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(version.into()),
            changes: vec![
                format!("LABEL {LABEL_IMAGE}=rootfs-{}", rootfs.name),
                format!("LABEL {LABEL_RECIPE}={}", base_hash(rootfs)),
                "CMD [\"/bin/sh\"]".into(),
            ],
            ..Default::default()
        };
        let file = tokio::fs::File::open(&tarball)
            .await
            .with_context(|| format!("failed to open {}", tarball.display()))?;
        let body = bollard::body_try_stream(file_chunks(file));
        let mut stream = self.docker.create_image(Some(opts), Some(body), None);
        while let Some(item) = stream.next().await {
            item.map_err(|e| anyhow!("failed to import {tag}: {}", error_chain(&e)))?;
        }
        if !self.image_exists(&tag).await? {
            bail!("importing {tag} ended without an image");
        }
        Ok(tag)
    }

    /// Import a root filesystem tarball as `reference` (`repo:tag`), like `docker import`:
    /// for images nsmatrix does not build itself (a busybox-only tree, a vendor's rootfs).
    pub async fn import_tarball(&self, tarball: &std::path::Path, reference: &str) -> Result<()> {
        let (repo, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
        let opts = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(tag.into()),
            ..Default::default()
        };
        let file = tokio::fs::File::open(tarball)
            .await
            .with_context(|| format!("failed to open {}", tarball.display()))?;
        let body = bollard::body_try_stream(file_chunks(file));
        let mut stream = self.docker.create_image(Some(opts), Some(body), None);
        while let Some(item) = stream.next().await {
            item.map_err(|e| anyhow!("failed to import {reference}: {}", error_chain(&e)))?;
        }
        Ok(())
    }

    /// Remove one image by reference (tests, `images prune` of foreign images is not done).
    pub async fn remove_image(&self, reference: &str) -> Result<()> {
        let opts = RemoveImageOptions {
            force: true,
            ..Default::default()
        };
        match self.docker.remove_image(reference, Some(opts), None).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to remove image {reference}")),
        }
    }

    pub(crate) async fn image_exists(&self, reference: &str) -> Result<bool> {
        match self.docker.inspect_image(reference).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("failed to inspect image {reference}")),
        }
    }

    /// `images list`: every image nsmatrix made, bases included, newest first.
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let opts = ListImagesOptions {
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![LABEL_IMAGE.to_string()],
            )])),
            ..Default::default()
        };
        let current = current_hashes();
        let mut out: Vec<ImageInfo> = self
            .docker
            .list_images(Some(opts))
            .await
            .context("failed to list images")?
            .into_iter()
            .map(|s| {
                let name = s.labels.get(LABEL_IMAGE).cloned().unwrap_or_default();
                let hash = s.labels.get(LABEL_RECIPE).cloned().unwrap_or_default();
                ImageInfo {
                    current: current.get(&name) == Some(&hash),
                    tag: s
                        .repo_tags
                        .iter()
                        .find(|t| t.starts_with(REPO_PREFIX))
                        .cloned()
                        .unwrap_or_default(),
                    name,
                    id: s.id,
                    size_bytes: s.size.max(0) as u64,
                    created_unix: s.created,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.created_unix
                .cmp(&a.created_unix)
                .then(a.name.cmp(&b.name))
        });
        Ok(out)
    }

    /// `images prune`: remove images nsmatrix made from recipes that changed since (`all`:
    /// every nsmatrix image). Returns the removed tags (or ids). Built images go before the
    /// bases they stand on.
    pub(crate) async fn prune_images(&self, all: bool) -> Result<Vec<String>> {
        let mut victims: Vec<ImageInfo> = self
            .list_images()
            .await?
            .into_iter()
            .filter(|i| all || !i.current)
            .collect();
        victims.sort_by_key(|i| i.name.starts_with("rootfs-"));
        let mut removed = Vec::new();
        for i in victims {
            let opts = RemoveImageOptions {
                force: true,
                ..Default::default()
            };
            match self.docker.remove_image(&i.id, Some(opts), None).await {
                Ok(_) => removed.push(if i.tag.is_empty() { i.id } else { i.tag }),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to remove image {}", i.tag));
                }
            }
        }
        Ok(removed)
    }
}

/// Catalog name → recipe hash, for everything this binary would build.
fn current_hashes() -> HashMap<String, String> {
    let mut m = HashMap::new();
    for r in ImageRecipe::catalog() {
        m.insert(format!("rootfs-{}", r.rootfs.name), base_hash(&r.rootfs));
        m.insert(r.name.clone(), r.hash());
    }
    m
}

fn file_chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; 1 << 20];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
