//! Artifacts fetched or built once and cached by content: Debian packages, kernels, images,
//! npm packages.

pub mod apparmor;
pub mod cache;
pub(crate) mod debian;
pub mod images;
pub(crate) mod kernels;
pub mod npm;
pub mod rootfs;
