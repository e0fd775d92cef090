//! [`Placement`]: where a batch's files go inside its container, the batch spec rewritten to
//! those paths, and the tar that carries them in.
//!
//! Layout inside the container: a fresh anonymous volume at [`PLACE_DIR`] (writable even on a
//! read-only root filesystem, and uploadable before the container starts) holds the agent,
//! the scenarios and the spec; a tmpfs mounted `exec,suid` at [`WORK_MOUNT`] is the agent's
//! work dir, so its setuid copies of bwrap keep their bit.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::protocol::{BatchSpec, Carry, Layout, SubjectSpec, relocate};

pub(crate) const PLACE_DIR: &str = "/nsmatrix";
pub(crate) const WORK_MOUNT: &str = "/nsmatrix-work";

/// One thing to copy from the host, at a path relative to [`PLACE_DIR`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    File {
        host: PathBuf,
        rel: String,
        mode: u32,
    },
    Dir {
        host: PathBuf,
        rel: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Placement {
    /// The spec as the agent inside sees it.
    pub spec: BatchSpec,
    /// Absolute path of the spec inside the container.
    pub spec_path: String,
    pub entries: Vec<Entry>,
    /// The agent binary on the host (also the first entry, unless bind-mounted instead).
    pub agent_host: PathBuf,
}

impl Placement {
    /// Plan where everything goes; pure (no file is read).
    pub(crate) fn plan(spec: &BatchSpec) -> Placement {
        let agent_host = spec.agent_bin.clone();
        let layout = Layout {
            agent: &format!("{PLACE_DIR}/bin/nsmatrix"),
            root: PLACE_DIR,
            work_dir: &format!("{WORK_MOUNT}/batch"),
        };
        let (spec, carry) = relocate(spec, &layout);
        let rel = |inside: String| {
            inside
                .strip_prefix(&format!("{PLACE_DIR}/"))
                .expect("relocated under PLACE_DIR")
                .to_string()
        };
        let entries = carry
            .into_iter()
            .map(|c| match c {
                Carry::File { host, inside, mode } => Entry::File {
                    host,
                    rel: rel(inside),
                    mode,
                },
                Carry::Dir { host, inside } => Entry::Dir {
                    host,
                    rel: rel(inside),
                },
            })
            .collect();
        Placement {
            spec,
            spec_path: format!("{PLACE_DIR}/batch.json"),
            entries,
            agent_host,
        }
    }

    /// The same placement with the Codex packages the engine already has in its own file
    /// system (a guest's read-only Codex disk, or this machine's package cache when the engine
    /// is local) bind-mounted read-only where the upload would have put them: `mounts` maps a
    /// Codex binary as the spec names it (on this machine) to its package's directory in the
    /// engine's file system. The cell's Codex keeps its path (`<PLACE_DIR>/codex/N/bin/codex`),
    /// so a mounted and an uploaded package look the same inside; only the copy is skipped.
    /// Returns the binds to add, as (source in the engine, target in the container).
    pub(crate) fn with_mounted_codex(
        mut self,
        original: &BatchSpec,
        mounts: &[(PathBuf, String)],
    ) -> (Placement, Vec<(String, String)>) {
        let mut binds: Vec<(String, String)> = Vec::new();
        for (i, cell) in original.cells.iter().enumerate() {
            let SubjectSpec::Codex {
                codex_bin: host, ..
            } = &cell.subject
            else {
                continue;
            };
            let Some((_, dir)) = mounts.iter().find(|(h, _)| h == host) else {
                continue;
            };
            let Some(SubjectSpec::Codex { codex_bin, .. }) =
                self.spec.cells.get(i).map(|c| &c.subject)
            else {
                continue;
            };
            // `<PLACE_DIR>/codex/N/bin/codex`: nothing under `codex/N/` is carried.
            let Some(pkg) = codex_bin.parent().and_then(Path::parent) else {
                continue;
            };
            let Ok(rel) = pkg.strip_prefix(PLACE_DIR) else {
                continue;
            };
            let prefix = format!("{}/", rel.display());
            self.entries
                .retain(|e| !matches!(e, Entry::File { rel, .. } if rel.starts_with(&prefix)));
            let bind = (dir.clone(), pkg.display().to_string());
            if !binds.contains(&bind) {
                binds.push(bind);
            }
        }
        (self, binds)
    }

    /// The package directories of the spec's Codex binaries on this machine, for an engine
    /// that shares this machine's file system: `<pkg>/bin/codex` → `<pkg>`.
    pub(crate) fn local_codex_packages(spec: &BatchSpec) -> Vec<(PathBuf, String)> {
        let mut out: Vec<(PathBuf, String)> = Vec::new();
        for cell in &spec.cells {
            let SubjectSpec::Codex { codex_bin, .. } = &cell.subject else {
                continue;
            };
            let Some(bin_dir) = codex_bin.parent() else {
                continue;
            };
            if bin_dir.file_name().is_none_or(|n| n != "bin") {
                continue;
            }
            let Some(pkg) = bin_dir.parent() else {
                continue;
            };
            if !out.iter().any(|(h, _)| h == codex_bin) {
                out.push((codex_bin.clone(), pkg.display().to_string()));
            }
        }
        out
    }

    /// The same placement with the agent bind-mounted at `spec.agent_bin` instead of uploaded.
    pub(crate) fn without_agent_upload(mut self) -> Placement {
        let agent = self.agent_host.clone();
        self.entries.retain(|e| !matches!(e, Entry::File { host, rel, .. } if *host == agent && rel == "bin/nsmatrix"));
        self
    }

    /// The bytes of the files the tar would carry (what it reads on the host).
    pub(crate) fn payload_bytes(&self) -> u64 {
        fn size(p: &Path) -> u64 {
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => std::fs::read_dir(p)
                    .map(|rd| rd.flatten().map(|e| size(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        self.entries
            .iter()
            .map(|e| match e {
                Entry::File { host, .. } | Entry::Dir { host, .. } => size(host),
            })
            .sum()
    }

    /// Write the tar to upload at [`PLACE_DIR`]: every entry, then `batch.json`. Owners are
    /// root and times are zero, so the upload does not depend on who owns the host's files.
    pub(crate) fn write_tar(&self, w: impl Write) -> io::Result<()> {
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Deterministic);
        let mut dirs_made = std::collections::BTreeSet::new();
        for e in &self.entries {
            let (host, rel) = match e {
                Entry::File { host, rel, .. } | Entry::Dir { host, rel } => (host, rel),
            };
            // Parent directories first, so the engine creates them 0755 root-owned.
            let mut parent = Path::new(rel).parent();
            let mut parents = Vec::new();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                parents.push(p.to_path_buf());
                parent = p.parent();
            }
            for p in parents.into_iter().rev() {
                if dirs_made.insert(p.clone()) {
                    append_dir(&mut b, &p)?;
                }
            }
            match e {
                Entry::File { mode, .. } => {
                    let mut f = std::fs::File::open(host).map_err(|err| with_path(err, host))?;
                    let mut h = tar::Header::new_gnu();
                    h.set_metadata_in_mode(&f.metadata()?, tar::HeaderMode::Deterministic);
                    h.set_mode(*mode);
                    b.append_data(&mut h, rel, &mut f)?;
                }
                Entry::Dir { .. } => {
                    b.append_dir_all(rel, host)
                        .map_err(|err| with_path(err, host))?;
                }
            }
        }
        let json = serde_json::to_vec_pretty(&self.spec).map_err(io::Error::other)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "batch.json", &json[..])?;
        b.into_inner()?.flush()
    }
}

fn append_dir(b: &mut tar::Builder<impl Write>, rel: &Path) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, rel, io::empty())
}

fn with_path(err: io::Error, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::protocol::{ArgvProfile, CellSpec, SetuidMode};

    fn cell(id: &str, dir: &Path, subject: SubjectSpec) -> CellSpec {
        CellSpec {
            id: id.into(),
            subject,
            scenario_dir: dir.to_path_buf(),
            timeout_ms: 1000,
            needs_sysctls: vec![],
        }
    }

    fn codex(bin: &str) -> SubjectSpec {
        SubjectSpec::Codex {
            version: "1".into(),
            codex_bin: bin.into(),
            hide_system_bwrap: false,
            entry: None,
        }
    }

    fn bwrap() -> SubjectSpec {
        SubjectSpec::Bwrap {
            build: "system".into(),
            setuid: SetuidMode::AsIs,
            argv: ArgvProfile::Codex,
        }
    }

    fn spec(agent: &Path, cells: Vec<CellSpec>) -> BatchSpec {
        BatchSpec {
            version: 1,
            batch_id: "b".into(),
            work_dir: "/host/work".into(),
            uid: 1000,
            gid: 1000,
            restrictions: Default::default(),
            sysctls: Default::default(),
            agent_bin: agent.to_path_buf(),
            kernel_log: None,
            cells,
        }
    }

    #[test]
    fn plan_rewrites_paths_and_dedups() {
        let s = spec(
            Path::new("/h/nsmatrix"),
            vec![
                cell("a", Path::new("/h/sc/add file"), bwrap()),
                cell("b", Path::new("/h/sc/add file"), bwrap()),
                cell(
                    "c",
                    Path::new("/h/sc/other"),
                    SubjectSpec::Codex {
                        version: "1".into(),
                        codex_bin: "/h/pkg/bin/codex".into(),
                        hide_system_bwrap: false,
                        entry: None,
                    },
                ),
            ],
        );
        let p = Placement::plan(&s);
        assert_eq!(p.spec.agent_bin, Path::new("/nsmatrix/bin/nsmatrix"));
        assert_eq!(p.spec.work_dir, Path::new("/nsmatrix-work/batch"));
        assert_eq!(
            p.spec.cells[0].scenario_dir,
            Path::new("/nsmatrix/scenarios/0-add_file")
        );
        assert_eq!(p.spec.cells[1].scenario_dir, p.spec.cells[0].scenario_dir);
        assert_eq!(
            p.spec.cells[2].scenario_dir,
            Path::new("/nsmatrix/scenarios/1-other")
        );
        assert!(matches!(&p.spec.cells[2].subject,
            SubjectSpec::Codex { codex_bin, .. } if codex_bin == Path::new("/nsmatrix/codex/0/bin/codex")));
        // The agent, two scenario dirs, Codex and its bundled bwrap in the package's layout.
        assert_eq!(p.entries.len(), 5, "{:?}", p.entries);
        assert!(p.entries.iter().any(|e| matches!(e, Entry::File { host, rel, .. }
            if host == Path::new("/h/pkg/codex-resources/bwrap") && rel == "codex/0/codex-resources/bwrap")));
        // Everything else is untouched.
        assert_eq!(
            (p.spec.uid, p.spec.gid, &p.spec.batch_id),
            (1000, 1000, &s.batch_id)
        );
    }

    #[test]
    fn a_mounted_codex_package_is_not_uploaded() {
        let s = spec(
            Path::new("/h/nsmatrix"),
            vec![
                cell("a", Path::new("/h/sc/x"), codex("/h/pkg/bin/codex")),
                cell("b", Path::new("/h/sc/x"), bwrap()),
                cell("c", Path::new("/h/sc/y"), codex("/h/other/bin/codex")),
            ],
        );
        let mounts = vec![(PathBuf::from("/h/pkg/bin/codex"), "/opt/codex".to_string())];
        let (p, binds) = Placement::plan(&s).with_mounted_codex(&s, &mounts);
        // Mounted where the upload would have put it: the cell's path does not change.
        assert_eq!(
            binds,
            [("/opt/codex".to_string(), "/nsmatrix/codex/0".to_string())]
        );
        assert!(matches!(&p.spec.cells[0].subject,
            SubjectSpec::Codex { codex_bin, .. } if codex_bin == Path::new("/nsmatrix/codex/0/bin/codex")));
        // The package that is not on the engine's disk is still uploaded, in its own slot.
        assert!(matches!(&p.spec.cells[2].subject,
            SubjectSpec::Codex { codex_bin, .. } if codex_bin == Path::new("/nsmatrix/codex/1/bin/codex")));
        let hosts: Vec<&Path> = p
            .entries
            .iter()
            .map(|e| match e {
                Entry::File { host, .. } | Entry::Dir { host, .. } => host.as_path(),
            })
            .collect();
        assert!(!hosts.contains(&Path::new("/h/pkg/bin/codex")), "{hosts:?}");
        assert!(
            !hosts.contains(&Path::new("/h/pkg/codex-resources/bwrap")),
            "{hosts:?}"
        );
        assert!(
            hosts.contains(&Path::new("/h/other/bin/codex")),
            "{hosts:?}"
        );
        assert!(
            hosts.contains(&Path::new("/h/other/codex-resources/bwrap")),
            "{hosts:?}"
        );
    }

    #[test]
    fn a_local_engine_mounts_each_codex_package_once() {
        let s = spec(
            Path::new("/h/nsmatrix"),
            vec![
                cell("a", Path::new("/h/sc/x"), codex("/h/pkg/bin/codex")),
                cell("b", Path::new("/h/sc/y"), codex("/h/pkg/bin/codex")),
                cell("c", Path::new("/h/sc/x"), bwrap()),
                // Not in an npm package's layout: uploaded as before.
                cell("d", Path::new("/h/sc/x"), codex("/h/loose/codex")),
            ],
        );
        let mounts = Placement::local_codex_packages(&s);
        assert_eq!(
            mounts,
            [(PathBuf::from("/h/pkg/bin/codex"), "/h/pkg".to_string())]
        );
        let (p, binds) = Placement::plan(&s).with_mounted_codex(&s, &mounts);
        assert_eq!(
            binds,
            [("/h/pkg".to_string(), "/nsmatrix/codex/0".to_string())]
        );
        assert!(
            p.entries.iter().any(
                |e| matches!(e, Entry::File { host, .. } if host == Path::new("/h/loose/codex"))
            )
        );
        assert!(
            !p.entries
                .iter()
                .any(|e| matches!(e, Entry::File { host, .. } if host.starts_with("/h/pkg")))
        );
    }

    #[test]
    fn tar_carries_agent_scenarios_and_spec() {
        let d = tempfile::tempdir().unwrap();
        let agent = d.path().join("agent");
        std::fs::write(&agent, b"#!bin").unwrap();
        let sc = d.path().join("sc1");
        std::fs::create_dir_all(sc.join("before")).unwrap();
        std::fs::write(sc.join("before/a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("a.txt", sc.join("before/link")).unwrap();
        let p = Placement::plan(&spec(&agent, vec![cell("a", &sc, bwrap())]));
        let mut buf = Vec::new();
        p.write_tar(&mut buf).unwrap();
        let mut ar = tar::Archive::new(&buf[..]);
        let mut seen = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            seen.insert(path, (e.header().mode().unwrap(), e.header().entry_type()));
        }
        assert_eq!(seen["bin/nsmatrix"].0, 0o755);
        assert!(seen.contains_key("bin"));
        assert!(seen.contains_key("scenarios/0-sc1/before/a.txt"));
        assert_eq!(
            seen["scenarios/0-sc1/before/link"].1,
            tar::EntryType::Symlink
        );
        assert!(seen.contains_key("batch.json"));
    }

    #[test]
    fn missing_host_file_names_its_path() {
        let p = Placement::plan(&spec(Path::new("/nonexistent/agent"), vec![]));
        let err = p.write_tar(io::sink()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent"), "{err}");
    }
}
