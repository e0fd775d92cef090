//! Checks of `[[expect]]` and `[[exclude]]` rules against the expanded matrix, after the cells
//! exist: every selector value must be a value its axis has (a typo such as
//! `profile = "holyclaud"` would otherwise fall back silently to a broader rule; near misses
//! get a hint), every expect rule must match a cell (unless `--allow-unused-rules`), and a
//! rule may only expect a signature the classifier can produce on the backends it covers.

use std::collections::{BTreeMap, BTreeSet};

use globset::Glob;

use super::diag::Diagnostic;
use super::model::Matrix;
use super::raw::scalar_text;
use super::raw::span;
use super::raw::{RawMatrix, Selector};
use super::select::selector_matches;

/// How strict loading is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// An expect rule that matches no cell is a warning on stderr, not an error.
    pub allow_unused_rules: bool,
}

/// Axes whose values are not a closed set (ids are globbed freely).
const OPEN_AXES: &[&str] = &["id"];

/// Every value each axis takes in the expanded matrix.
fn axis_values(m: &Matrix) -> BTreeMap<&str, BTreeSet<&str>> {
    let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for c in &m.cells {
        for (k, v) in &c.axes {
            out.entry(k.as_str()).or_default().insert(v.as_str());
        }
    }
    out
}

/// `{a,b*}x` → `["ax", "b*x"]` (one level of braces, as the matrix uses them).
fn alternatives(pattern: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (pattern.find('{'), pattern.find('}')) else {
        return vec![pattern.to_string()];
    };
    if close < open {
        return vec![pattern.to_string()];
    }
    let (head, rest) = (&pattern[..open], &pattern[close + 1..]);
    pattern[open + 1..close]
        .split(',')
        .flat_map(|alt| alternatives(&format!("{head}{alt}{rest}")))
        .collect()
}

fn is_glob(p: &str) -> bool {
    p.contains(['*', '?', '['])
}

fn matches_some(pattern: &str, values: &BTreeSet<&str>) -> bool {
    if !is_glob(pattern) {
        return values.contains(pattern);
    }
    Glob::new(pattern)
        .map(|g| {
            let m = g.compile_matcher();
            values.iter().any(|v| m.is_match(v))
        })
        .unwrap_or(false)
}

/// Levenshtein distance (small strings only).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known value closest to `wrong`, if it is close enough to be a typo.
pub fn near_miss<'a>(wrong: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let wrong_plain = wrong.replace(['*', '?'], "");
    known
        .into_iter()
        .map(|k| (distance(&wrong_plain, k), k))
        .filter(|(d, k)| *d <= (k.chars().count() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn check_values(
    what: &str,
    sel: &Selector,
    values: &BTreeMap<&str, BTreeSet<&str>>,
    diags: &mut Vec<Diagnostic>,
) {
    for (axis, v) in sel {
        if OPEN_AXES.contains(&axis.as_str()) {
            continue;
        }
        let Some(known) = values.get(axis.as_str()) else {
            // The key check in `load` names unknown axes; an axis no cell has is unused.
            continue;
        };
        let Some(text) = scalar_text(v.get_ref()) else {
            continue;
        };
        for alt in alternatives(&text) {
            if matches_some(&alt, known) {
                continue;
            }
            let mut d = Diagnostic::new(
                "unknown-axis-value",
                span(v),
                format!("{what}: `{axis}` has no value `{alt}` in this matrix"),
            );
            let list = known.iter().copied().collect::<Vec<_>>().join(", ");
            match near_miss(&alt, known.iter().copied()) {
                Some(m) => d.help(format!("did you mean `{m}`? values of `{axis}`: {list}")),
                None => d.help(format!("values of `{axis}`: {list}")),
            };
            diags.push(d);
        }
    }
}

/// Diagnostics for the rules of `raw` against the expanded `m`: errors, then warnings that
/// `opts` relaxed (returned separately, for stderr).
pub fn rules(raw: &RawMatrix, m: &Matrix, opts: LoadOptions) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let values = axis_values(m);
    for ex in &raw.exclude {
        check_values("exclude", ex.get_ref(), &values, &mut errors);
    }
    for ex in &raw.expect {
        let r = ex.get_ref();
        let before = errors.len();
        check_values("expect", r.when.get_ref(), &values, &mut errors);
        if errors.len() > before {
            continue;
        }
        let matched: Vec<_> = m
            .cells
            .iter()
            .filter(|c| {
                selector_matches(r.when.get_ref(), &|k| {
                    if k == "id" {
                        Some(c.id.clone())
                    } else {
                        c.axes.get(k).cloned()
                    }
                })
            })
            .collect();
        if matched.is_empty() {
            let mut d = Diagnostic::new(
                "unused-rule",
                span(&r.when),
                "this expect rule matches no cell of the matrix",
            );
            d.help(
                "fix the selector or remove the rule (`--allow-unused-rules` makes this a warning)",
            );
            if opts.allow_unused_rules {
                warnings.push(d);
            } else {
                errors.push(d);
            }
            continue;
        }
        if let Some(sig) = &r.fail {
            let backends: BTreeSet<&str> =
                matched.iter().map(|c| c.env.backend().as_str()).collect();
            for b in backends {
                if let Err(why) = crate::sandbox::signature::expectable_on(sig.get_ref(), b) {
                    let mut d = Diagnostic::new(
                        "unexpectable-signature",
                        span(sig),
                        format!("`{}` cannot be expected on {b} cells: {why}", sig.get_ref()),
                    );
                    d.help(format!(
                        "expect one of: {}",
                        crate::sandbox::signature::expectable_names(b).join(", ")
                    ));
                    errors.push(d);
                }
            }
        }
    }
    (errors, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::diag::MatrixError;
    use std::path::Path;

    fn default_text() -> String {
        std::fs::read_to_string("matrix.toml").unwrap()
    }

    fn errors_of(text: &str, opts: LoadOptions) -> Vec<Diagnostic> {
        match super::super::load::load_str_with(Path::new("matrix.toml"), text, opts) {
            Ok(_) => Vec::new(),
            Err(MatrixError::Invalid { diagnostics, .. }) => diagnostics,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_default_matrix_passes_every_check() {
        assert!(errors_of(&default_text(), LoadOptions::default()).is_empty());
    }

    #[test]
    fn a_when_typo_is_an_error_with_a_hint_and_its_position() {
        let text = default_text().replacen(
            r#"profile = "holyclaude" }"#,
            r#"profile = "holyclaud" }"#,
            1,
        );
        assert_ne!(text, default_text());
        let d = errors_of(&text, LoadOptions::default());
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].code, "unknown-axis-value");
        assert!(d[0].message.contains("no value `holyclaud`"), "{d:?}");
        assert!(
            d[0].help
                .as_deref()
                .unwrap()
                .starts_with("did you mean `holyclaude`?"),
            "{d:?}"
        );
        let at = d[0].span.clone().unwrap();
        assert_eq!(&text[at], r#""holyclaud""#);
        // Inside a brace alternative too.
        let text = default_text().replacen(
            "{seccomp-unconfined,holyclaude*}",
            "{seccomp-unconfind,holyclaude*}",
            1,
        );
        let d = errors_of(&text, LoadOptions::default());
        assert!(
            d.iter().any(|d| d.message.contains("`seccomp-unconfind`")
                && d.help.as_deref().unwrap().contains("`seccomp-unconfined`")),
            "{d:?}"
        );
    }

    #[test]
    fn a_rule_matching_no_cell_is_an_error_unless_allowed() {
        // Every value exists, but no qemu cell has an image.
        let text = format!(
            "{}\n[[expect]]\nwhen = {{ backend = \"qemu\", image = \"trixie\" }}\nfail = \"userns-denied\"\n",
            default_text()
        );
        let d = errors_of(&text, LoadOptions::default());
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].code, "unused-rule");
        let relaxed = LoadOptions {
            allow_unused_rules: true,
        };
        assert!(errors_of(&text, relaxed).is_empty());
    }

    #[test]
    fn only_signatures_the_classifier_produces_there_are_expectable() {
        for (sig, code) in [
            ("unknown", "unexpectable-signature"),
            ("tree-mismatch", "unexpectable-signature"),
            ("output-mismatch", "unexpectable-signature"),
        ] {
            let text = format!(
                "{}\n[[expect]]\nwhen = {{ backend = \"host\", profile = \"none\" }}\nfail = \"{sig}\"\n",
                default_text()
            );
            let d = errors_of(&text, LoadOptions::default());
            assert!(d.iter().any(|d| d.code == code), "{sig}: {d:?}");
        }
        // A sysctl is only ever missing in a guest: not expectable on the host.
        let text = format!(
            "{}\n[[expect]]\nwhen = {{ backend = \"host\", profile = \"none\" }}\nfail = \"sysctl-missing\"\n",
            default_text()
        );
        let d = errors_of(&text, LoadOptions::default());
        assert!(
            d.iter()
                .any(|d| d.code == "unexpectable-signature" && d.message.contains("host")),
            "{d:?}"
        );
    }

    #[test]
    fn near_misses() {
        let known = [
            "holyclaude",
            "holyclaude+net-admin",
            "default",
            "privileged",
        ];
        assert_eq!(near_miss("holyclaud", known), Some("holyclaude"));
        assert_eq!(near_miss("defualt", known), Some("default"));
        assert_eq!(near_miss("zzz", known), None);
        assert_eq!(
            alternatives("{a,b*}-x"),
            vec!["a-x".to_string(), "b*-x".to_string()]
        );
    }
}
