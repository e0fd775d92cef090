//! The Codex versions a matrix names, checked against the npm registry's list before anything
//! runs: an unknown version, or one without a linux-x64 build, is an error at its place in the
//! file naming the nearest releases that exist.

use super::diag::Diagnostic;
use super::raw::RawMatrix;
use super::raw::span;

/// Every `version` of a `kind = "codex"` subject that `known` (the registry's linux-x64
/// releases, fetched only when a version is not cached already) does not have.
pub(super) fn check(
    raw: &RawMatrix,
    is_cached: &dyn Fn(&str) -> bool,
    known: &mut dyn FnMut() -> Result<Vec<String>, String>,
) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let mut list: Option<Result<Vec<String>, String>> = None;
    for s in &raw.subject {
        let s = s.get_ref();
        if s.kind.get_ref() != "codex" {
            continue;
        }
        let Some(v) = &s.version else { continue };
        let values: Vec<String> = match v.get_ref() {
            toml::Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect(),
            toml::Value::String(one) => vec![one.clone()],
            _ => continue,
        };
        for version in values {
            if is_cached(&version) {
                continue;
            }
            match list.get_or_insert_with(&mut *known) {
                Err(e) => {
                    let mut d = Diagnostic::new(
                        "codex-version-unchecked",
                        span(v),
                        format!(
                            "Codex {version} is not cached and the npm registry's list of Codex releases could not be had: {e}"
                        ),
                    );
                    d.help("reach registry.npmjs.org once (or set NSMATRIX_NPM_REGISTRY to a mirror), or use a version that is cached");
                    diags.push(d);
                }
                Ok(known) if !known.contains(&version) => {
                    let nearest = crate::artifacts::npm::nearest_versions(&version, known);
                    let mut d = Diagnostic::new(
                        "unknown-codex-version",
                        span(v),
                        format!(
                            "@openai/codex {version} has no linux-x64 build on the npm registry (it does not exist, or was published for other platforms only)"
                        ),
                    );
                    d.help(if nearest.is_empty() {
                        "the registry lists no linux-x64 release of Codex".to_string()
                    } else {
                        format!("nearest releases that exist: {}", nearest.join(", "))
                    });
                    diags.push(d);
                }
                Ok(_) => {}
            }
        }
    }
    diags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(versions: &str) -> RawMatrix {
        toml::from_str(&format!(
            "[[subject]]\nname = \"codex\"\nkind = \"codex\"\nversion = {versions}\n"
        ))
        .unwrap()
    }

    fn known() -> Result<Vec<String>, String> {
        Ok(["0.113.0", "0.115.0", "0.171.0"].map(String::from).to_vec())
    }

    #[test]
    fn an_unknown_version_names_its_neighbours() {
        let d = check(&raw("[\"0.114.0\", \"0.171.0\"]"), &|_| false, &mut known);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].code, "unknown-codex-version");
        assert!(d[0].message.contains("0.114.0"), "{}", d[0].message);
        assert_eq!(
            d[0].help.as_deref(),
            Some("nearest releases that exist: 0.113.0, 0.115.0")
        );
        assert!(d[0].span.is_some());
    }

    #[test]
    fn cached_versions_need_no_registry_and_offline_is_an_error() {
        let mut offline = || Err("connection refused".to_string());
        assert!(check(&raw("\"0.171.0\""), &|v| v == "0.171.0", &mut offline).is_empty());
        let d = check(
            &raw("[\"0.171.0\", \"0.116.0\"]"),
            &|v| v == "0.171.0",
            &mut offline,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].code, "codex-version-unchecked");
        assert!(d[0].message.contains("connection refused"));
    }

    #[test]
    fn the_list_is_fetched_once() {
        let mut calls = 0;
        let mut counting = || {
            calls += 1;
            known()
        };
        let d = check(
            &raw("[\"0.113.0\", \"0.115.0\"]"),
            &|_| false,
            &mut counting,
        );
        assert!(d.is_empty());
        assert_eq!(calls, 1);
    }
}
