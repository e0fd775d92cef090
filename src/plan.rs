//! The plan step: selected cells → a [`Plan`] of batches, each with its backend and its
//! ready-made [`BatchSpec`], plus the cells that cannot run here with the reason (a backend
//! that is unavailable, a Codex release that cannot be had, a host sysctl a container needs).
//! Everything decided before the first batch starts is decided here; the scheduler only
//! dispatches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, Registry};
use crate::matrix::model::{BackendKind, Cell, Environment};
use crate::protocol::{BatchSpec, CellSpec, CodexEntry, PROTOCOL_VERSION, SubjectSpec};

/// One environment's cells: the unit that is sharded, batched and retried.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) env: Environment,
    pub(crate) cells: Vec<Cell>,
}

impl Group {
    /// Estimated cost of running this group as one batch, for `--shard`.
    pub(crate) fn cost_ms(&self) -> u64 {
        let codex = self
            .cells
            .iter()
            .filter(|c| !matches!(c.subject.spec, SubjectSpec::Bwrap { .. }))
            .count();
        crate::backend::estimated_cost_ms(self.env.backend(), self.cells.len() - codex, codex)
    }
}

/// Cells grouped by environment, groups in order of their first cell, cells in their order.
pub(crate) fn group(cells: Vec<Cell>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for cell in cells {
        let i = *index.entry(cell.env.id.clone()).or_insert_with(|| {
            groups.push(Group {
                env: cell.env.clone(),
                cells: Vec::new(),
            });
            groups.len() - 1
        });
        groups[i].cells.push(cell);
    }
    groups
}

/// One environment's runnable cells on their backend.
pub(crate) struct Batch {
    pub(crate) env: Environment,
    pub(crate) cells: Vec<Cell>,
    pub(crate) backend: Arc<dyn Backend>,
    /// The spec of the batch's first attempt (named after the environment).
    pub(crate) spec: BatchSpec,
}

impl Batch {
    /// The spec of one attempt (a repeat, a retry): named `id`, with only `cells`.
    pub(crate) fn spec_for(&self, id: &str, cells: &[Cell]) -> BatchSpec {
        respec(
            &self.spec,
            id,
            cells.iter().map(|c| c.id.as_str()).collect(),
        )
    }
}

/// `spec` renamed to `id` (its work dir too), keeping only the cells named in `keep`.
fn respec(spec: &BatchSpec, id: &str, keep: HashSet<&str>) -> BatchSpec {
    let mut spec = spec.clone();
    spec.work_dir = spec
        .work_dir
        .parent()
        .map(|p| p.join(id))
        .unwrap_or_else(|| PathBuf::from(id));
    spec.batch_id = id.to_string();
    spec.cells.retain(|c| keep.contains(c.id.as_str()));
    spec
}

/// What a run will do.
pub(crate) struct Plan {
    pub(crate) batches: Vec<Batch>,
    /// Cells that will not run, with the SKIP reason, in their order.
    pub(crate) skipped: Vec<(Cell, String)>,
    /// The backends the batches use, each once.
    pub(crate) backends: Vec<Arc<dyn Backend>>,
}

/// What the plan needs from the run besides the cells.
pub(crate) struct PlanOptions<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) agent_bin: PathBuf,
    pub(crate) cell_timeout: Duration,
}

/// Turn `groups` into a plan: probe the backends they use, fetch the Codex releases they name,
/// and give every runnable group its batch spec. `say` gets the notes a user should see.
pub(crate) async fn prepare(
    registry: &Registry,
    groups: Vec<Group>,
    opts: &PlanOptions<'_>,
    say: &mut dyn FnMut(&str),
) -> Plan {
    let groups = resolve_codex(groups, say).await;
    let mut plan = Plan {
        batches: Vec::new(),
        skipped: Vec::new(),
        backends: Vec::new(),
    };
    let mut announced = HashSet::new();
    let mut announced_notes = HashSet::new();
    for (g, skips) in groups {
        // A host fact the environment needs comes before the backend's availability.
        let env_skip = crate::backend::host_check(&g.env);
        let skips: Skips = skips
            .into_iter()
            .map(|s| s.or_else(|| env_skip.clone()))
            .collect();
        let backend = match registry.get(g.env.backend()) {
            Ok(b) => b.clone(),
            Err(u) => {
                if announced.insert(g.env.backend()) {
                    say(&format!(
                        "nsmatrix: skipping {} cells: {u}",
                        g.env.backend().as_str()
                    ));
                }
                for (cell, skip) in g.cells.into_iter().zip(skips) {
                    let reason = skip.unwrap_or_else(|| u.to_string());
                    plan.skipped.push((cell, reason));
                }
                continue;
            }
        };
        let mut cells = Vec::new();
        for (cell, skip) in g.cells.into_iter().zip(skips) {
            match skip {
                Some(reason) => plan.skipped.push((cell, reason)),
                None => cells.push(cell),
            }
        }
        if cells.is_empty() {
            continue;
        }
        let base = base_spec(
            &g.env.id,
            &g.env,
            &cells,
            &opts.agent_bin,
            opts.cell_timeout,
        );
        let spec = backend.prepare(opts.run_id, &g.env, base);
        if !plan.backends.iter().any(|b| b.kind() == backend.kind()) {
            for note in backend.notes() {
                // The qemu and guest-docker backends may share one QEMU: one note.
                if announced_notes.insert(note.clone()) {
                    say(&format!("nsmatrix: note: {note}"));
                }
            }
            plan.backends.push(backend.clone());
        }
        plan.batches.push(Batch {
            env: g.env,
            cells,
            backend,
            spec,
        });
    }
    plan
}

/// The backend-neutral part of a batch spec (paths as on this machine; the backend's
/// [`Backend::prepare`] adds its own part and its transport relocates).
pub(crate) fn base_spec(
    batch: &str,
    env: &Environment,
    cells: &[Cell],
    agent_bin: &std::path::Path,
    cell_timeout: Duration,
) -> BatchSpec {
    BatchSpec {
        version: PROTOCOL_VERSION,
        batch_id: batch.to_string(),
        work_dir: PathBuf::from(crate::backend::DEFAULT_WORK_ROOT).join(batch),
        uid: env.uid,
        gid: env.uid,
        restrictions: Default::default(),
        sysctls: Default::default(),
        agent_bin: agent_bin.to_path_buf(),
        kernel_log: None,
        cells: cells
            .iter()
            .map(|c| CellSpec {
                id: c.id.clone(),
                subject: c.subject.spec.clone(),
                scenario_dir: c.scenario.dir.clone(),
                timeout_ms: cell_timeout.as_millis() as u64,
                needs_sysctls: Vec::new(),
            })
            .collect(),
    }
}

/// Cells' own skip reasons so far, one per cell.
type Skips = Vec<Option<String>>;

/// Fetch (once, verified, cached) every Codex release the cells name and point their subjects
/// at it; cells of a release that cannot be had get the reason.
async fn resolve_codex(groups: Vec<Group>, say: &mut dyn FnMut(&str)) -> Vec<(Group, Skips)> {
    let mut versions: Vec<String> = groups
        .iter()
        .flat_map(|g| &g.cells)
        .filter_map(|c| match &c.subject.spec {
            SubjectSpec::Codex { version, .. } => Some(version.clone()),
            _ => None,
        })
        .collect();
    versions.sort();
    versions.dedup();
    let mut found: BTreeMap<String, Result<(PathBuf, Option<CodexEntry>), String>> =
        BTreeMap::new();
    for v in versions {
        say(&format!(
            "nsmatrix: getting Codex CLI {v} (npm, cached after the first time)"
        ));
        let vv = v.clone();
        // How the release enters its sandbox is read here, once, from its own `--help` (a
        // few milliseconds natively; a guest would pay a cold start of the binary under TCG,
        // about 0.5 s, in every batch).
        let r = tokio::task::spawn_blocking(move || {
            crate::artifacts::npm::codex_package(&vv).map(|p| {
                // A CODEX_HOME of its own, not under /tmp (which Codex refuses).
                let home = crate::artifacts::cache::cache_dir()
                    .join("npm")
                    .join(format!("help-home-{}-{vv}", std::process::id()));
                // Only a form the release shows is carried: a release this machine cannot run
                // or read is asked again where its cells run, which says why for itself.
                let entry = std::fs::create_dir_all(&home)
                    .ok()
                    .map(|_| CodexEntry::detect(&p.codex, &home))
                    .filter(|e| !matches!(e, CodexEntry::None(_)));
                let _ = std::fs::remove_dir_all(&home);
                (p.codex, entry)
            })
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("{e:#}")));
        if let Err(e) = &r {
            say(&format!("nsmatrix: Codex CLI {v} is not available: {e}"));
        }
        found.insert(v, r);
    }
    groups
        .into_iter()
        .map(|mut g| {
            let skips = g
                .cells
                .iter_mut()
                .map(|c| {
                    let mut skip = c.skip.clone();
                    if let SubjectSpec::Codex {
                        version,
                        codex_bin,
                        entry,
                        ..
                    } = &mut c.subject.spec
                    {
                        match found.get(version.as_str()) {
                            Some(Ok((p, e))) => {
                                *codex_bin = p.clone();
                                *entry = e.clone();
                            }
                            Some(Err(e)) => {
                                skip = skip.or(Some(format!(
                                    "Codex CLI {version} could not be fetched and is not cached: {e} (fix: reach the npm registry once, or set NSMATRIX_NPM_REGISTRY)"
                                )))
                            }
                            None => {}
                        }
                    }
                    skip
                })
                .collect();
            (g, skips)
        })
        .collect()
}

/// The backend kinds `groups` use, for probing only those.
pub(crate) fn kinds(groups: &[Group]) -> Vec<BackendKind> {
    let mut k: Vec<BackendKind> = groups.iter().map(|g| g.env.backend()).collect();
    k.sort();
    k.dedup();
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_for_renames_and_keeps_only_the_given_cells() {
        let spec = BatchSpec {
            version: PROTOCOL_VERSION,
            batch_id: "env".into(),
            work_dir: PathBuf::from("/w/run/env"),
            uid: 1000,
            gid: 1000,
            restrictions: Default::default(),
            sysctls: Default::default(),
            agent_bin: "/a".into(),
            kernel_log: None,
            cells: ["a", "b"]
                .iter()
                .map(|id| CellSpec {
                    id: id.to_string(),
                    subject: SubjectSpec::Codex {
                        version: "1".into(),
                        codex_bin: "/c".into(),
                        hide_system_bwrap: false,
                        entry: None,
                    },
                    scenario_dir: "/s".into(),
                    timeout_ms: 1,
                    needs_sysctls: vec![],
                })
                .collect(),
        };
        let r = respec(&spec, "env.retry1", HashSet::from(["b"]));
        assert_eq!(r.batch_id, "env.retry1");
        assert_eq!(r.work_dir, PathBuf::from("/w/run/env.retry1"));
        assert_eq!(r.cells.len(), 1);
        assert_eq!(r.cells[0].id, "b");
        assert_eq!(r.cells[0], spec.cells[1]);
    }
}
