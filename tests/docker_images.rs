//! Real Docker: nsmatrix's images are built without a registry, cached by recipe, listed.
//! Without an engine these tests skip loudly, or fail when CI is set (see tests/common).

mod common;

use nsmatrix::artifacts::images::ImageRecipe;
use nsmatrix::backend::docker::{DockerBackend, connect};

async fn engine() -> Option<DockerBackend> {
    match connect().await {
        Ok(b) => Some(b),
        Err(u) => {
            common::require(false, &format!("a Docker engine: {u}"));
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_images_build_once_and_list() {
    let Some(d) = engine().await else { return };
    let started = std::time::Instant::now();
    let tags = d
        .build_images(&[], false, &mut |line| eprintln!("images: {line}"))
        .await
        .expect("images build");
    eprintln!(
        "built or found {} images in {:?}",
        tags.len(),
        started.elapsed()
    );
    assert_eq!(tags.len(), ImageRecipe::catalog().len());

    // Second time: every image is found by its recipe tag, nothing is built.
    let again = std::time::Instant::now();
    let mut lines = Vec::new();
    d.build_images(&["bookworm-suid".into()], false, &mut |l| {
        lines.push(l.to_string())
    })
    .await
    .unwrap();
    assert!(lines.is_empty(), "rebuilt although cached: {lines:?}");
    assert!(again.elapsed().as_secs() < 5);

    let list = d.list_images().await.unwrap();
    for r in ImageRecipe::catalog() {
        let i = list
            .iter()
            .find(|i| i.tag == r.tag())
            .unwrap_or_else(|| panic!("{} not listed", r.tag()));
        assert!(i.current, "{} not current", i.tag);
    }
    assert!(
        list.iter()
            .any(|i| i.name == "rootfs-bookworm" && i.current)
    );

    // A name nobody knows is an error that says so, not a pull.
    let err = d
        .ensure_image("nsmatrix-test/does-not-exist:1")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no registry"), "{err:#}");
}
