//! The catalog of Docker images nsmatrix builds without a registry: [`ImageRecipe`]s from
//! `vm-images/docker/`, their content hashes, tags, labels and build contexts.
//!
//! Pure data: the Docker backend (`backend::docker`) does the importing and building.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::artifacts::rootfs::RootfsRecipe;

/// Bump when the way an image is made from its recipe changes (import options, labels).
const BUILD_FORMAT: u32 = 1;

/// On every image nsmatrix imports or builds: the catalog name (or `rootfs-NAME` for a base).
pub(crate) const LABEL_IMAGE: &str = "nsmatrix.image";
/// The recipe hash the image was built from.
pub(crate) const LABEL_RECIPE: &str = "nsmatrix.recipe";
/// Repository prefix of every image nsmatrix makes.
pub(crate) const REPO_PREFIX: &str = "nsmatrix/";

const CATALOG: &str = include_str!("../../vm-images/docker/images.toml");
const DOCKERFILES: &[(&str, &str)] = &[
    (
        "bookworm.Dockerfile",
        include_str!("../../vm-images/docker/bookworm.Dockerfile"),
    ),
    (
        "bookworm-suid.Dockerfile",
        include_str!("../../vm-images/docker/bookworm-suid.Dockerfile"),
    ),
    (
        "trixie.Dockerfile",
        include_str!("../../vm-images/docker/trixie.Dockerfile"),
    ),
    (
        "trixie-suid.Dockerfile",
        include_str!("../../vm-images/docker/trixie-suid.Dockerfile"),
    ),
    (
        "no-bwrap.Dockerfile",
        include_str!("../../vm-images/docker/no-bwrap.Dockerfile"),
    ),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    image: BTreeMap<String, RawImage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    rootfs: String,
    dockerfile: String,
    #[serde(default)]
    description: String,
}

/// One buildable image: a Dockerfile on top of a root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecipe {
    pub name: String,
    pub rootfs: RootfsRecipe,
    /// The Dockerfile's text; it starts `ARG BASE` / `FROM ${BASE}`.
    pub dockerfile: String,
    pub description: String,
}

impl ImageRecipe {
    /// Every image in `vm-images/docker/images.toml`, by name.
    pub fn catalog() -> Vec<ImageRecipe> {
        parse_catalog(CATALOG, |f| {
            DOCKERFILES
                .iter()
                .find(|(n, _)| *n == f)
                .map(|(_, t)| t.to_string())
        })
        .expect("the built-in image catalog is valid")
    }

    pub fn builtin(name: &str) -> Option<ImageRecipe> {
        Self::catalog().into_iter().find(|r| r.name == name)
    }

    /// Hex SHA-256 of everything the image is made of (its root filesystem's hash included).
    pub(crate) fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("format={BUILD_FORMAT}\0name={}\0", self.name));
        h.update(format!("rootfs={}\0", self.rootfs.hash()));
        h.update(self.dockerfile.as_bytes());
        hex::encode(h.finalize())
    }

    /// `nsmatrix/NAME:HASH12`: one tag per recipe version, so a lookup by tag is a cache check.
    pub fn tag(&self) -> String {
        format!("{REPO_PREFIX}{}:{}", self.name, &self.hash()[..12])
    }

    /// The tar the engine builds from: just the Dockerfile.
    pub(crate) fn build_context(&self) -> Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(self.dockerfile.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        b.append_data(&mut header, "Dockerfile", self.dockerfile.as_bytes())?;
        Ok(b.into_inner()?)
    }
}

/// The base image a root filesystem is imported as: `nsmatrix/rootfs-NAME:HASH12`.
pub(crate) fn base_tag(rootfs: &RootfsRecipe) -> String {
    format!(
        "{REPO_PREFIX}rootfs-{}:{}",
        rootfs.name,
        &base_hash(rootfs)[..12]
    )
}

/// The recipe hash of a base image (its root filesystem's, plus how it is imported).
pub(crate) fn base_hash(rootfs: &RootfsRecipe) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "format={BUILD_FORMAT}\0base\0rootfs={}",
        rootfs.hash()
    ));
    hex::encode(h.finalize())
}

fn parse_catalog(
    text: &str,
    dockerfile: impl Fn(&str) -> Option<String>,
) -> Result<Vec<ImageRecipe>> {
    let raw: RawCatalog = toml::from_str(text).context("failed to parse images.toml")?;
    raw.image
        .into_iter()
        .map(|(name, img)| {
            let rootfs = RootfsRecipe::builtin(&img.rootfs).ok_or_else(|| {
                anyhow!(
                    "image {name:?}: unknown root filesystem recipe {:?}",
                    img.rootfs
                )
            })?;
            let dockerfile = dockerfile(&img.dockerfile).ok_or_else(|| {
                anyhow!(
                    "image {name:?}: Dockerfile {:?} is not compiled in",
                    img.dockerfile
                )
            })?;
            Ok(ImageRecipe {
                name,
                rootfs,
                dockerfile,
                description: img.description,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_the_required_images() {
        let names: Vec<String> = ImageRecipe::catalog().into_iter().map(|r| r.name).collect();
        for want in [
            "bookworm",
            "bookworm-suid",
            "trixie",
            "trixie-suid",
            "no-bwrap",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        for r in ImageRecipe::catalog() {
            assert!(
                r.dockerfile.contains("FROM ${BASE}"),
                "{} ignores BASE",
                r.name
            );
        }
    }

    #[test]
    fn hashes_and_tags_are_distinct_and_stable() {
        let a = ImageRecipe::builtin("bookworm").unwrap();
        let b = ImageRecipe::builtin("bookworm-suid").unwrap();
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), ImageRecipe::builtin("bookworm").unwrap().hash());
        assert!(a.tag().starts_with("nsmatrix/bookworm:"));
        let mut c = a.clone();
        c.rootfs.include.push("strace".into());
        assert_ne!(a.hash(), c.hash());
        assert!(base_tag(&a.rootfs).starts_with("nsmatrix/rootfs-bookworm:"));
    }

    #[test]
    fn build_context_holds_the_dockerfile() {
        let r = ImageRecipe::builtin("no-bwrap").unwrap();
        let ctx = r.build_context().unwrap();
        let mut ar = tar::Archive::new(&ctx[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["Dockerfile"]);
    }

    #[test]
    fn catalog_errors_name_the_image() {
        let err =
            parse_catalog("[image.x]\nrootfs='nope'\ndockerfile='d'\n", |_| None).unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
    }
}
