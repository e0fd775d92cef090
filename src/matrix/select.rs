//! Selecting cells: `axis = value` selectors (exclude, include, expect) and `--filter`.

use globset::Glob;

use super::model::Cell;
use super::raw::Selector;
use super::raw::{all_axes, scalar_text};

/// All keys of the selector match (values may be globs).
pub fn selector_matches(sel: &Selector, get: &dyn Fn(&str) -> Option<String>) -> bool {
    sel.iter().all(|(k, v)| {
        let Some(have) = get(k) else { return false };
        let want = scalar_text(v.get_ref()).unwrap_or_default();
        glob_eq(&want, &have)
    })
}

fn glob_eq(pattern: &str, value: &str) -> bool {
    if pattern == value {
        return true;
    }
    if pattern.contains(['*', '?', '[', '{']) {
        return Glob::new(pattern)
            .map(|g| g.compile_matcher().is_match(value))
            .unwrap_or(false);
    }
    false
}

/// `--filter` expressions: `axis=value` (value may be a glob) or an id glob. All must match.
#[derive(Debug, Clone)]
pub struct Filter {
    exprs: Vec<(Option<String>, String)>,
}

impl Filter {
    pub fn parse(exprs: &[String]) -> Result<Filter, String> {
        let known = all_axes();
        let mut out = Vec::new();
        for e in exprs {
            match e.split_once('=') {
                Some((k, v)) => {
                    let k = k.trim();
                    if !known.contains(k) {
                        return Err(format!(
                            "--filter {e}: no axis `{k}` (axes: {})",
                            known.iter().copied().collect::<Vec<_>>().join(", ")
                        ));
                    }
                    out.push((Some(k.to_string()), v.trim().to_string()));
                }
                None => {
                    Glob::new(e).map_err(|err| format!("--filter {e}: {err}"))?;
                    out.push((None, e.clone()));
                }
            }
        }
        Ok(Filter { exprs: out })
    }

    pub fn matches(&self, cell: &Cell) -> bool {
        self.matches_axes(&cell.id, &cell.axes)
    }

    /// The same test on a cell's id and axes (a recorded result's, say).
    pub fn matches_axes(
        &self,
        id: &str,
        axes: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        self.exprs.iter().all(|(k, v)| match k {
            None => {
                glob_eq(v, id)
                    || Glob::new(v)
                        .map(|g| g.compile_matcher().is_match(id))
                        .unwrap_or(false)
            }
            Some(k) if k == "id" => glob_eq(v, id),
            Some(k) => axes.get(k).is_some_and(|have| glob_eq(v, have)),
        })
    }
}
