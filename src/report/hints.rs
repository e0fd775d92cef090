//! Remedy hints computed from what actually ran: for each failing environment × subject, the
//! passing ones that differ from it in exactly one axis ("passes with profile=holyclaude+net-admin").
//! Never a table of guesses: a hint names only a combination that was run and passed.

use std::collections::BTreeMap;

use super::model::CellResult;

/// Axes that name a cell rather than describe it.
const NAMING_AXES: &[&str] = &["environment", "subject", "kind", "set", "scenario"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// `environment/subject`.
    pub group: String,
    /// The most common signature of the group's failing cells.
    pub signature: String,
    /// `axis=value` changes that make every scenario of the group pass.
    pub fixes: Vec<String>,
}

struct Group<'a> {
    axes: BTreeMap<&'a str, &'a str>,
    all_pass: bool,
    sigs: BTreeMap<&'a str, usize>,
}

pub fn one_axis_fixes(cells: &[CellResult]) -> Vec<Hint> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for c in cells {
        if c.status == super::Status::Skip || c.status == super::Status::Error {
            continue;
        }
        let key = format!("{}/{}", c.environment, c.subject);
        let g = groups.entry(key).or_insert_with(|| Group {
            axes: c
                .axes
                .iter()
                .filter(|(k, _)| !NAMING_AXES.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            all_pass: true,
            sigs: BTreeMap::new(),
        });
        if c.observed != "pass" {
            g.all_pass = false;
            *g.sigs
                .entry(c.signature.as_deref().unwrap_or(c.observed.as_str()))
                .or_default() += 1;
        }
    }
    let mut hints = Vec::new();
    for (name, g) in &groups {
        if g.all_pass {
            continue;
        }
        let mut fixes = Vec::new();
        for other in groups
            .values()
            .filter(|o| o.all_pass && o.axes.len() == g.axes.len())
        {
            let diff: Vec<(&str, &str)> = g
                .axes
                .iter()
                .filter_map(|(k, v)| match other.axes.get(k) {
                    Some(ov) if ov == v => None,
                    Some(ov) => Some((*k, *ov)),
                    None => Some((*k, "?")),
                })
                .collect();
            if let [(k, v)] = diff.as_slice()
                && *v != "?"
            {
                fixes.push(format!("{k}={v}"));
            }
        }
        fixes.sort();
        fixes.dedup();
        let signature = g
            .sigs
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(s, _)| s.to_string())
            .unwrap_or_default();
        hints.push(Hint {
            group: name.clone(),
            signature,
            fixes,
        });
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::model::Expectation;
    use crate::report::Status;

    fn cell(env: &str, profile: &str, setuid: &str, observed: &str) -> CellResult {
        let axes: BTreeMap<String, String> = [
            ("environment", "docker"),
            ("profile", profile),
            ("setuid", setuid),
            ("scenario", "a"),
            ("set", "s"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        CellResult {
            id: format!("{env}/bwrap/s/a"),
            environment: env.into(),
            backend: "docker".into(),
            subject: format!("bwrap+{setuid}"),
            scenario_set: "s".into(),
            scenario: "a".into(),
            axes,
            status: if observed == "pass" {
                Status::Pass
            } else {
                Status::Xfail
            },
            expected: Expectation::Pass,
            observed: observed.into(),
            signature: (observed != "pass").then(|| observed.to_string()),
            message: String::new(),
            remedy: None,
            exit_code: None,
            duration_ms: 1,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            details: BTreeMap::new(),
            attempts: 1,
            ordinal: 0,
            repeat: 1,
            repeats: Vec::new(),
            flaky: false,
            evidence: BTreeMap::new(),
        }
    }

    #[test]
    fn names_only_single_axis_changes_that_passed() {
        let cells = vec![
            cell("docker-default", "default", "false", "userns-denied"),
            cell("docker-holy", "holy", "false", "pass"),
            cell("docker-holy", "holy", "true", "capset-denied"),
            cell("docker-default", "default", "true", "userns-denied"),
        ];
        let hints = one_axis_fixes(&cells);
        let h = hints
            .iter()
            .find(|h| h.group == "docker-default/bwrap+false")
            .unwrap();
        assert_eq!(h.fixes, vec!["profile=holy"]);
        assert_eq!(h.signature, "userns-denied");
        let h = hints
            .iter()
            .find(|h| h.group == "docker-holy/bwrap+true")
            .unwrap();
        assert_eq!(h.fixes, vec!["setuid=false"]);
        // Two axes away from the only passing group: no hint.
        let h = hints
            .iter()
            .find(|h| h.group == "docker-default/bwrap+true")
            .unwrap();
        assert!(h.fixes.is_empty());
    }
}
