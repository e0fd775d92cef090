//! [`DockerBackend`]: the one Docker client of nsmatrix. Connects (version negotiated), labels
//! what it creates with its owner, and sweeps leftovers of runs that were killed.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};

use crate::backend::Unavailable;
pub(super) use crate::text::error_chain;

/// Every container nsmatrix creates carries this label, valued with the run id.
pub(crate) const LABEL_RUN: &str = "nsmatrix.run";
/// `<boot id>/<pid>/<process start time>` of the nsmatrix process that created the container.
pub(crate) const LABEL_OWNER: &str = "nsmatrix.owner";
pub(crate) const LABEL_BATCH: &str = "nsmatrix.batch";

/// Engine calls that return promptly (not streams): bollard applies this per request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `doctor` shows about the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// `unix:///var/run/docker.sock` or `$DOCKER_HOST`.
    pub endpoint: String,
    pub version: String,
    /// The API version both sides agreed on.
    pub api_version: String,
    pub kernel: String,
    pub os: String,
}

/// A connected Docker engine. Cheap to clone; share one per run.
#[derive(Debug, Clone)]
pub struct DockerBackend {
    pub(super) docker: Docker,
    pub(super) engine: EngineInfo,
    pub(super) agent_placement: AgentPlacement,
    /// Codex packages the engine has in its own file system (a guest's read-only Codex disk):
    /// the binary as a spec names it on this machine → the package's directory there.
    pub(super) codex_mounts: Vec<(std::path::PathBuf, String)>,
    /// The agent binary (this build) in the engine's own file system, to bind-mount.
    pub(super) agent_in_engine: Option<std::path::PathBuf>,
    /// A text copy of the engine kernel's log in the engine's own file system, to bind-mount.
    pub(super) kernel_log_in_engine: Option<std::path::PathBuf>,
}

/// How the agent binary gets into a batch's container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentPlacement {
    /// Bind-mount it read-only when the engine is local (a unix socket), upload it otherwise.
    #[default]
    Auto,
    /// Always upload it with the scenarios (remote engines; tests of the upload path).
    Upload,
}

/// Connect to `$DOCKER_HOST` or the local socket and negotiate the API version. Never panics
/// and never hangs: an engine that does not answer in 10 s is unavailable.
pub async fn connect() -> Result<DockerBackend, Unavailable> {
    connect_to(std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty())).await
}

/// Connect to one engine endpoint (`unix:///path`, `tcp://host:port`; `None`: the local
/// socket). An engine that runs elsewhere, in a guest say, is reached the same way through the
/// endpoint forwarded to it; combine with [`AgentPlacement::Upload`] when that engine does
/// not share this machine's files.
pub async fn connect_to(host: Option<String>) -> Result<DockerBackend, Unavailable> {
    let endpoint = host
        .clone()
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    let fix = |detail: &str| -> String {
        match &host {
            Some(h) => {
                format!("check DOCKER_HOST={h} ({detail}), or unset it to use the local socket")
            }
            None => format!("start dockerd ({detail}), or set DOCKER_HOST"),
        }
    };
    let docker = Docker::connect_with_host(&endpoint).map_err(|e| Unavailable {
        reason: format!("failed to set up a Docker client for {endpoint}: {e}"),
        fix: fix("as root: `dockerd &` or `systemctl start docker`"),
    })?;
    let docker = docker.with_timeout(REQUEST_TIMEOUT);
    let negotiated = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version()).await;
    let docker = match negotiated {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            let text = error_chain(&e);
            let detail = if text.contains("ermission denied") {
                "permission denied on the socket: run as root or join the docker group"
            } else {
                "as root: `dockerd &` or `systemctl start docker`"
            };
            return Err(Unavailable {
                reason: format!("no Docker engine answers at {endpoint}: {text}"),
                fix: fix(detail),
            });
        }
        Err(_) => {
            return Err(Unavailable {
                reason: format!(
                    "the Docker engine at {endpoint} did not answer within {CONNECT_TIMEOUT:?}"
                ),
                fix: fix("is dockerd hung?"),
            });
        }
    };
    let v = docker.version().await.map_err(|e| Unavailable {
        reason: format!(
            "the Docker engine at {endpoint} failed to report its version: {}",
            error_chain(&e)
        ),
        fix: fix("check the engine's log"),
    })?;
    let engine = EngineInfo {
        endpoint,
        version: v.version.unwrap_or_default(),
        api_version: docker.client_version().to_string(),
        kernel: v.kernel_version.unwrap_or_default(),
        os: v.os.unwrap_or_default(),
    };
    Ok(DockerBackend {
        docker,
        engine,
        agent_placement: AgentPlacement::Auto,
        codex_mounts: Vec::new(),
        agent_in_engine: None,
        kernel_log_in_engine: None,
    })
}

impl DockerBackend {
    pub(crate) fn engine(&self) -> &EngineInfo {
        &self.engine
    }

    /// The engine has the Codex package whose binary is `host_bin` on this machine at `dir`
    /// in its own file system: containers bind-mount it read-only instead of an upload.
    pub fn with_codex_mount(mut self, host_bin: std::path::PathBuf, dir: String) -> Self {
        self.codex_mounts.push((host_bin, dir));
        self
    }

    pub fn with_agent_placement(mut self, placement: AgentPlacement) -> Self {
        self.agent_placement = placement;
        self
    }

    /// Bind-mount the agent (no copy of a 50-110 MB binary per batch) when the engine shares
    /// this machine's filesystem, as a local socket suggests; creation falls back to an upload
    /// if the engine cannot see the path after all.
    pub(super) fn mount_agent(&self) -> bool {
        self.agent_in_engine.is_some()
            || (self.agent_placement == AgentPlacement::Auto
                && self.engine.endpoint.starts_with("unix://"))
    }

    /// The engine has this build's binary at `path` in its own file system (an engine guest's
    /// copy of its init): containers bind-mount it read-only instead of an upload.
    pub fn with_agent_in_engine(mut self, path: std::path::PathBuf) -> Self {
        self.agent_in_engine = Some(path);
        self
    }

    /// The engine's kernel writes its log to the text file `path` in the engine's own file
    /// system (an engine guest's relay): containers bind-mount it read-only, and their agent
    /// attaches the lines of each cell's time to the cell.
    pub fn with_kernel_log(mut self, path: std::path::PathBuf) -> Self {
        self.kernel_log_in_engine = Some(path);
        self
    }

    /// Remove containers labelled `nsmatrix.run` whose creating process is gone (a run killed
    /// with SIGKILL, a crash, a reboot). Containers of live nsmatrix processes, this one
    /// included, are left alone. Returns how many were removed.
    pub async fn sweep(&self) -> Result<usize> {
        let me = Owner::current();
        let mut removed = 0;
        for (id, labels) in self.labelled_containers(None).await? {
            let owner = labels.get(LABEL_OWNER).and_then(|o| Owner::parse(o));
            let alive = match (&owner, &me) {
                (Some(o), Some(me)) if o.boot == me.boot => o.is_alive(),
                // Another machine's (or another boot's) run: only the label's run id tells,
                // and nothing tells whether that run lives. Leave it.
                (Some(_), _) => true,
                (None, _) => false,
            };
            if !alive {
                self.remove_container(&id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Remove every container of one run, live or not (a second Ctrl-C, tests).
    pub(crate) async fn remove_run(&self, run_id: &str) -> Result<usize> {
        let list = self.labelled_containers(Some(run_id)).await?;
        for (id, _) in &list {
            self.remove_container(id).await?;
        }
        Ok(list.len())
    }

    /// Ids of containers (any state) with label `nsmatrix.run` (or `nsmatrix.run=<run_id>`).
    pub async fn run_containers(&self, run_id: Option<&str>) -> Result<Vec<String>> {
        Ok(self
            .labelled_containers(run_id)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    async fn labelled_containers(
        &self,
        run_id: Option<&str>,
    ) -> Result<Vec<(String, HashMap<String, String>)>> {
        let label = match run_id {
            Some(r) => format!("{LABEL_RUN}={r}"),
            None => LABEL_RUN.to_string(),
        };
        let opts = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_string(), vec![label])])),
            ..Default::default()
        };
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .context("failed to list nsmatrix containers")?;
        Ok(list
            .into_iter()
            .filter_map(|c| Some((c.id?, c.labels.unwrap_or_default())))
            .collect())
    }

    /// Force-remove a container and its anonymous volumes; gone already is fine.
    pub(super) async fn remove_container(&self, id: &str) -> Result<()> {
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            // Removal already under way (another sweep, the engine's own).
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to remove container {id}")),
        }
    }
}

/// Which process created a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Owner {
    boot: String,
    pid: u32,
    start: u64,
}

impl Owner {
    pub(super) fn current() -> Option<Owner> {
        let pid = std::process::id();
        Some(Owner {
            boot: boot_id()?,
            pid,
            start: start_time(pid)?,
        })
    }

    pub(super) fn label(&self) -> String {
        format!("{}/{}/{}", self.boot, self.pid, self.start)
    }

    fn parse(s: &str) -> Option<Owner> {
        let mut it = s.split('/');
        let o = Owner {
            boot: it.next()?.to_string(),
            pid: it.next()?.parse().ok()?,
            start: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(o)
    }

    fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

fn boot_id() -> Option<String> {
    Some(
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()?
            .trim()
            .to_string(),
    )
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot (tells a reused pid).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_roundtrip_and_liveness() {
        let me = Owner::current().expect("linux has boot_id and /proc/self/stat");
        assert_eq!(Owner::parse(&me.label()), Some(me.clone()));
        assert!(me.is_alive());
        let dead = Owner {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!dead.is_alive());
        assert_eq!(Owner::parse("a/b/c"), None);
        assert_eq!(Owner::parse("a/1/2/3"), None);
    }
}
