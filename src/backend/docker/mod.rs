//! The Docker backend: [`DockerBackend`] runs each batch in its own labelled container, builds
//! nsmatrix's images without a registry and maps security profiles onto containers. Every
//! bollard call of nsmatrix lives under this module; no bollard type leaves it.

mod backend;
mod batch;
mod client;
mod images;
mod place;
mod profile;
mod stream;
mod user_image;

pub(crate) use backend::host_sysctl_mismatch;
pub use client::{AgentPlacement, DockerBackend, EngineInfo, connect, connect_to};
pub use user_image::ImageUser;
