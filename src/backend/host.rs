//! The host backend: runs a batch's agent as a child process on this machine, the static
//! nsmatrix binary itself (`nsmatrix agent --batch FILE`), with the environment's profile
//! turned into process-level restrictions.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use anyhow::Context;
use futures_util::future::BoxFuture;

use super::{Backend, BackendEvent, BatchCtx, BatchError, Stage, Unavailable};
use crate::matrix::model::{BackendKind, Environment, Profile, Settings};
use crate::protocol::{AgentEvent, BatchSpec, LineBuf, Restrictions};

/// How long an interrupted agent gets to clean up (kill its sandbox, remove its directory)
/// before it is killed.
const GRACE: Duration = Duration::from_secs(5);

pub(crate) struct HostBackend {
    /// Parent of every run's directory (`/var/tmp/nsmatrix` by default).
    pub work_root: PathBuf,
}

impl HostBackend {
    /// The host backend needs root: setuid copies, seccomp without no-new-privileges, the
    /// drop to the cell's uid.
    pub(crate) fn probe(settings: &Settings) -> Result<HostBackend, Unavailable> {
        if unsafe { libc::geteuid() } != 0 {
            return Err(Unavailable {
                reason: "the host backend must run as root (setuid copies, seccomp filters, the drop to the cell's uid)".into(),
                fix: "run nsmatrix with sudo".into(),
            });
        }
        Ok(HostBackend {
            work_root: settings.host_work_dir.clone(),
        })
    }

    /// The restrictions a host profile asks for.
    pub(crate) fn restrictions(profile: Option<&Profile>) -> Restrictions {
        let Some(p) = profile else {
            return Restrictions::default();
        };
        Restrictions {
            seccomp_deny_userns: p.seccomp.as_deref() == Some("deny-userns"),
            no_new_privileges: p.no_new_privileges,
            bounding_set: p.bounding_set.clone(),
            userns_limit: p.userns_limit,
            outer_bwrap: p.outer_sandbox.as_deref() == Some("bwrap"),
            outer_disable_userns: p.outer_disable_userns,
            userns_depth: p.userns_depth,
            protect_kernel_tunables: p.protect_kernel_tunables,
            protect_proc: p.protect_proc.clone(),
            proc_subset: p.proc_subset.clone().filter(|s| s != "all"),
            apparmor: None,
        }
    }

    /// This run's private directory (0755: cells' uids must reach and read their workspaces'
    /// ancestors).
    pub(crate) fn run_dir(&self, run_id: &str) -> PathBuf {
        self.work_root.join(run_id)
    }

    /// Remove directories of earlier runs whose nsmatrix process is gone (killed runs leave
    /// setuid copies behind otherwise).
    pub(crate) fn sweep(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.work_root) else {
            return removed;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let alive = std::fs::read_to_string(dir.join("owner.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive && std::fs::remove_dir_all(&dir).is_ok() {
                removed.push(dir);
            }
        }
        removed
    }

    /// Create this run's directory and mark it as ours.
    pub(crate) fn claim(&self, run_id: &str) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.run_dir(run_id);
        std::fs::create_dir_all(&dir)?;
        for d in [&self.work_root, &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
        Ok(dir)
    }

    pub(crate) async fn run_batch(
        &self,
        _env: &Environment,
        spec: BatchSpec,
        ctx: &BatchCtx,
    ) -> Result<(), BatchError> {
        let start = Instant::now();
        ctx.send(BackendEvent::StageStarted {
            batch: ctx.batch_id.clone(),
            stage: Stage::Start,
        });
        let io_err =
            |what: &str, e: std::io::Error| BatchError::new(Stage::Start, format!("{what}: {e}"));
        std::fs::create_dir_all(&ctx.log_dir)
            .map_err(|e| io_err("failed to create the log directory", e))?;
        let spec_path = ctx.log_dir.join("batch.json");
        let json = serde_json::to_vec_pretty(&spec).expect("batch spec serialises");
        std::fs::write(&spec_path, json)
            .map_err(|e| io_err("failed to write the batch spec", e))?;
        let exe = spec.agent_bin.clone();
        let mut child = Command::new(&exe)
            .arg("agent")
            .arg("--batch")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| io_err(&format!("failed to start {}", exe.display()), e))?;
        ctx.send(BackendEvent::StageFinished {
            batch: ctx.batch_id.clone(),
            stage: Stage::Start,
            elapsed: start.elapsed(),
        });

        let run_start = Instant::now();
        ctx.send(BackendEvent::StageStarted {
            batch: ctx.batch_id.clone(),
            stage: Stage::Run,
        });
        let mut stdout = child.stdout.take().expect("piped");
        let mut lines = LineBuf::default();
        let mut buf = vec![0u8; 64 * 1024];
        let stderr = child.stderr.take().expect("piped");
        let log_path = ctx.log_dir.join("agent.log");
        let stderr_task = tokio::spawn(copy_to_log(stderr, log_path.clone()));
        let deadline = tokio::time::sleep(ctx.timeout);
        tokio::pin!(deadline);
        let mut finished = false;
        let mut protocol_log = tokio::fs::File::create(ctx.log_dir.join("agent.jsonl"))
            .await
            .ok();
        let outcome: Result<(), BatchError> = loop {
            tokio::select! {
                read = stdout.read(&mut buf) => match read {
                    Ok(n) => {
                        let mut got = lines.push(&buf[..n]);
                        if n == 0 {
                            got.extend(lines.finish());
                        }
                        let mut malformed = None;
                        for line in got {
                            if let Some(f) = protocol_log.as_mut() {
                                let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                            }
                            match AgentEvent::parse_line(&line) {
                                Some(Ok(ev)) => {
                                    if matches!(ev, AgentEvent::BatchDone { .. }) {
                                        finished = true;
                                    }
                                    ctx.agent_event(ev);
                                }
                                Some(Err(e)) => {
                                    malformed = Some(BatchError::new(Stage::Run, format!("agent sent a malformed line ({e}): {line}")));
                                    break;
                                }
                                None => {}
                            }
                        }
                        if let Some(e) = malformed {
                            break Err(e);
                        }
                        if n == 0 {
                            break Ok(());
                        }
                    }
                    Err(e) => break Err(BatchError::new(Stage::Run, format!("failed to read the agent's output: {e}"))),
                },
                _ = &mut deadline => {
                    break Err(BatchError::new(Stage::Run, format!("the batch did not finish within {:?}", ctx.timeout)));
                }
                _ = ctx.cancel.cancelled() => {
                    break Err(BatchError::new(Stage::Run, "cancelled"));
                }
            }
        };
        ctx.send(BackendEvent::StageFinished {
            batch: ctx.batch_id.clone(),
            stage: Stage::Run,
            elapsed: run_start.elapsed(),
        });

        let td = Instant::now();
        ctx.send(BackendEvent::StageStarted {
            batch: ctx.batch_id.clone(),
            stage: Stage::Teardown,
        });
        let status = stop(&mut child, outcome.is_err()).await;
        let _ = stderr_task.await;
        // The agent removes its directory itself; this catches a killed agent's leftovers
        // (setuid copies above all).
        if spec.work_dir.exists() {
            let _ = std::fs::remove_dir_all(&spec.work_dir);
        }
        ctx.send(BackendEvent::StageFinished {
            batch: ctx.batch_id.clone(),
            stage: Stage::Teardown,
            elapsed: td.elapsed(),
        });
        outcome?;
        if !finished {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(BatchError::new(
                Stage::Run,
                format!(
                    "the agent ended ({status}) before finishing the batch; its stderr: {}",
                    crate::text::tail(tail.trim())
                ),
            ));
        }
        Ok(())
    }
}

impl Backend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    /// The profile's process-level restrictions; the work dir under this run's directory.
    fn prepare(&self, run_id: &str, env: &Environment, mut spec: BatchSpec) -> BatchSpec {
        spec.restrictions = HostBackend::restrictions(env.host().and_then(|h| h.profile.as_ref()));
        spec.work_dir = self.run_dir(run_id).join(&spec.batch_id);
        spec
    }

    fn begin_run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            self.sweep();
            self.claim(run_id)
                .context("failed to create the host run directory")?;
            Ok(())
        })
    }

    fn run_batch<'a>(
        &'a self,
        env: &'a Environment,
        spec: BatchSpec,
        ctx: &'a BatchCtx,
    ) -> BoxFuture<'a, Result<(), BatchError>> {
        Box::pin(HostBackend::run_batch(self, env, spec, ctx))
    }

    /// Every agent removes its own batch directory; this is the fallback for killed ones (and,
    /// after a second Ctrl-C, for agents still running).
    fn end_run<'a>(&'a self, run_id: &'a str, _abort: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = std::fs::remove_dir_all(self.run_dir(run_id));
        })
    }

    fn describe(&self) -> Vec<(String, String)> {
        vec![("host backend".into(), "available".into())]
    }
}

/// Stop the agent: on an early end, SIGTERM first so it cleans up, then SIGKILL.
async fn stop(child: &mut tokio::process::Child, early: bool) -> String {
    if early && let Some(pid) = child.id() {
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        if let Ok(Ok(st)) = tokio::time::timeout(GRACE, child.wait()).await {
            return st.to_string();
        }
        let _ = child.start_kill();
    }
    match child.wait().await {
        Ok(st) => st.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

async fn copy_to_log(mut r: impl tokio::io::AsyncRead + Unpin, path: PathBuf) {
    if let Ok(mut f) = tokio::fs::File::create(&path).await {
        let _ = tokio::io::copy(&mut r, &mut f).await;
    }
}
