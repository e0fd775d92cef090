//! The README's cell counts are the default matrix's: each count the README states is checked
//! against `nsmatrix list` (scripts/readme-figures.py regenerates the measured tables from a
//! run). Needs only the binary.

mod common;

use common::*;

/// Cells `nsmatrix list` expands for these filters.
fn listed(filters: &[&str]) -> usize {
    let mut args = vec!["list"];
    for f in filters {
        args.extend(["--filter", f]);
    }
    let o = nsmatrix(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).lines().count()
}

/// The number right after `before` in the README (`before` must occur exactly once).
fn stated(readme: &str, before: &str) -> usize {
    let hits: Vec<_> = readme.match_indices(before).collect();
    assert_eq!(
        hits.len(),
        1,
        "README.md should say {before:?} exactly once"
    );
    let rest = &readme[hits[0].0 + before.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {before:?} in README.md"))
}

#[test]
fn readme_cell_counts_are_the_default_matrix_counts() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for (before, filters) in [
        ("\nthe default matrix (", &[][..]),
        ("bwrap 0.8.0), all ", &["backend=host"][..]),
        (
            "The whole Docker part of the default matrix (",
            &["backend=docker"][..],
        ),
    ] {
        let want = listed(filters);
        let got = stated(&readme, before);
        assert_eq!(
            got, want,
            "README.md says {before}{got}… but `nsmatrix list` {filters:?} has {want} cells: \
             regenerate the figures (scripts/readme-figures.py) and update README.md"
        );
    }
}
