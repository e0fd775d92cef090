//! [`DockerBackend::run_batch`]: one container per batch, the agent as its main process.
//!
//! Why not a long-lived container plus `exec`: the agent is the only process a batch needs,
//! and an image may hold no shell or `sleep` to keep a container alive (busybox-only,
//! distroless). So the container is created with the agent as its command (as root; the agent
//! drops to the batch's uid itself), the agent is bind-mounted read-only (local engines) or
//! uploaded, the scenarios and spec are uploaded into its volume before it starts,
//! and its output is attached before it starts, so no line is lost. docker-init is PID 1 and
//! reaps what the sandboxes leave behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, UploadToContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::client::{DockerBackend, LABEL_BATCH, LABEL_OWNER, LABEL_RUN, Owner, error_chain};
use super::place::{PLACE_DIR, Placement, WORK_MOUNT};
use super::profile::{Seccomp, SecuritySettings, security_settings};
use super::stream::{AgentReader, BatchLog, CELL_GRACE};
use crate::backend::{BatchCtx, BatchError, Stage, Stages};
use crate::matrix::model::{DockerEnv, Environment, ImageSource};
use crate::protocol::BatchSpec;

impl DockerBackend {
    /// Run one batch in a fresh container and stream the agent's events to `ctx`. The
    /// container is removed on every path: success, failure, `ctx.timeout` (which covers start
    /// and run, not the first build of an image), `ctx.cancel`, and this future being dropped.
    pub async fn run_batch(
        &self,
        env: &Environment,
        spec: BatchSpec,
        ctx: &BatchCtx,
    ) -> Result<(), BatchError> {
        let stages = Stages::new(ctx);
        stages.start(Stage::Provision);
        let image = tokio::select! {
            r = self.provision(env) => r?,
            _ = ctx.cancel.cancelled() => return Err(BatchError::new(Stage::Provision, "cancelled")),
        };
        stages.finish(Stage::Provision);

        let slot = ContainerSlot::new(self.clone());
        let mut log = BatchLog::open(ctx).await;
        stages.start(Stage::Start);
        let started = Instant::now();
        let outcome = tokio::select! {
            r = self.start_and_run(env, &image, spec, ctx, &slot, &stages, &mut log) => r,
            _ = tokio::time::sleep(ctx.timeout) => Err(BatchError::new(
                stages.current(),
                format!("batch timed out after {:.0?}; its container was killed", started.elapsed()),
            )),
            _ = ctx.cancel.cancelled() => Err(BatchError::new(stages.current(), "cancelled")),
        };
        if let Err(e) = &outcome {
            log.line(&format!("nsmatrix: {e}")).await;
        }
        stages.finish_current();
        stages.start(Stage::Teardown);
        let removed = slot.remove().await;
        stages.finish(Stage::Teardown);
        log.flush().await;
        match (outcome, removed) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(BatchError::new(Stage::Teardown, format!("{e:#}"))),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// The image reference of `env`'s container in this engine, built or found first.
    pub(crate) async fn provision(&self, env: &Environment) -> Result<String, BatchError> {
        let d = docker_env(env)?;
        let r = match &d.image_source {
            Some(ImageSource::Recipe(name)) => self.ensure_recipe_image(name).await,
            Some(ImageSource::Reference(r)) => self.ensure_local_image(r).await,
            None => self.ensure_image(&d.image).await,
        };
        r.map_err(|e| BatchError::new(Stage::Provision, format!("{e:#}")))
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_and_run(
        &self,
        env: &Environment,
        image: &str,
        spec: BatchSpec,
        ctx: &BatchCtx,
        slot: &ContainerSlot,
        stages: &Stages<'_>,
        log: &mut BatchLog,
    ) -> Result<(), BatchError> {
        let fail = |stage: Stage, what: &str, e: &dyn std::fmt::Display| {
            BatchError::new(stage, format!("failed to {what}: {e}"))
        };
        let d = docker_env(env)?;
        let sec = security_settings(d.profile.as_ref(), d.read_only)
            .map_err(|e| fail(Stage::Start, "map the security profile", &e))?;
        let seccomp_json = match &sec.seccomp {
            Seccomp::File(path) => Some(
                read_seccomp(path)
                    .await
                    .map_err(|e| BatchError::new(Stage::Start, e))?,
            ),
            _ => None,
        };
        // Codex packages are bind-mounted read-only, never copied, wherever the engine has them:
        // a guest's Codex disk, or this machine's package cache for a local engine.
        let plan = |local: bool| {
            let mounts = if !self.codex_mounts.is_empty() {
                self.codex_mounts.clone()
            } else if local {
                Placement::local_codex_packages(&spec)
            } else {
                Vec::new()
            };
            let (mut p, mut binds) = Placement::plan(&spec).with_mounted_codex(&spec, &mounts);
            if let Some(log) = &self.kernel_log_in_engine {
                p.spec.kernel_log = Some(format!("{PLACE_DIR}/kernel.log").into());
                binds.push((log.display().to_string(), format!("{PLACE_DIR}/kernel.log")));
            }
            (p, binds)
        };
        let mut mount_agent = self.mount_agent();
        let (mut placement, mut codex_binds) = plan(mount_agent && self.agent_in_engine.is_none());
        // With the agent (and Codex) bind-mounted, what is left (the scenarios and the spec)
        // goes down the container's stdin: the engine's archive API re-executes dockerd to
        // unpack an upload, which costs 1.2-1.7 s a container in a TCG guest.
        let by_stdin = |mount_agent: bool, p: &Placement| {
            mount_agent && p.clone().without_agent_upload().payload_bytes() <= STDIN_PAYLOAD_MAX
        };
        let timeouts: HashMap<String, Duration> = placement
            .spec
            .cells
            .iter()
            .map(|c| (c.id.clone(), Duration::from_millis(c.timeout_ms)))
            .collect();

        log.line(&format!(
            "nsmatrix: image {image}, environment {}, security {sec:?}, uid {}",
            env.id, spec.uid
        ))
        .await;
        let created = loop {
            let body = container_body(
                image,
                &sec,
                seccomp_json.clone(),
                &placement,
                by_stdin(mount_agent, &placement),
                mount_agent.then_some(
                    self.agent_in_engine
                        .as_deref()
                        .unwrap_or(placement.agent_host.as_path()),
                ),
                &codex_binds,
                &ctx.run_id,
                &ctx.batch_id,
            );
            match self
                .docker
                .create_container(None::<CreateContainerOptions>, body)
                .await
            {
                Ok(c) => break c,
                Err(e) if mount_agent && error_chain(&e).contains("bind source path") => {
                    log.line(&format!(
                        "nsmatrix: the engine cannot bind-mount this machine's files ({}); uploading the agent and Codex instead",
                        error_chain(&e)
                    ))
                    .await;
                    mount_agent = false;
                    (placement, codex_binds) = plan(false);
                }
                Err(e) => return Err(fail(Stage::Start, "create the container", &error_chain(&e))),
            }
        };
        slot.set(created.id.clone());
        let id = created.id;
        log.line(&format!("nsmatrix: container {id}")).await;
        let stdin = by_stdin(mount_agent, &placement);
        let placement = if mount_agent {
            placement.without_agent_upload()
        } else {
            placement
        };

        let payload = if stdin {
            let p = placement.clone();
            let mut tar = Vec::new();
            tokio::task::spawn_blocking(move || p.write_tar(&mut tar).map(|_| tar))
                .await
                .map_err(|e| fail(Stage::Start, "pack the scenarios", &e))?
                .map_err(|e| fail(Stage::Start, "pack the scenarios", &e))
                .map(Some)?
        } else {
            self.upload(&id, placement)
                .await
                .map_err(|e| fail(Stage::Start, "place the agent and scenarios", &e))?;
            None
        };
        let attach_opts = AttachContainerOptions {
            stream: true,
            stdin,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = self
            .docker
            .attach_container(&id, Some(attach_opts))
            .await
            .map_err(|e| fail(Stage::Start, "attach to the container", &error_chain(&e)))?;
        self.docker.start_container(&id, None).await.map_err(|e| {
            fail(
                Stage::Start,
                "start the container",
                &start_hint(error_chain(&e)),
            )
        })?;
        if let Some(tar) = payload {
            log.line(&format!(
                "nsmatrix: the scenarios and spec go down stdin ({} bytes of tar)",
                tar.len()
            ))
            .await;
            let mut input = attached.input;
            // The agent unpacks it and reads its spec only after the end of the archive; a
            // write that fails shows as the agent's own error on stderr.
            input
                .write_all(&tar)
                .await
                .map_err(|e| fail(Stage::Start, "send the scenarios down stdin", &e))?;
            input
                .shutdown()
                .await
                .map_err(|e| fail(Stage::Start, "close the container's stdin", &e))?;
        }

        let mut reader = AgentReader::new(ctx, stages, timeouts);
        let mut output = attached.output;
        loop {
            let deadline = reader.next_deadline();
            let item = tokio::select! {
                item = output.next() => item,
                _ = sleep_until_opt(deadline) => {
                    let (cell, limit) = reader.overdue().expect("a deadline belongs to a cell");
                    return Err(BatchError::new(Stage::Run, format!(
                        "cell {cell} did not finish within its timeout ({limit:?}) plus {CELL_GRACE:?}; its container was killed")));
                }
            };
            match item {
                None => break,
                Some(Ok(LogOutput::StdOut { message })) => reader.stdout(&message, log).await,
                Some(Ok(LogOutput::StdErr { message })) => reader.stderr(&message, log).await,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(fail(
                        stages.current(),
                        "read the agent's output",
                        &error_chain(&e),
                    ));
                }
            }
        }
        reader.flush(log).await;
        let code = self.exit_code(&id).await;
        log.line(&format!("nsmatrix: agent exited with {code:?}"))
            .await;
        if reader.done() {
            return Ok(());
        }
        Err(BatchError::new(
            stages.current(),
            format!(
                "the agent exited ({}) before the batch was done; stderr tail:\n{}",
                code.map_or_else(|| "unknown status".to_string(), |c| format!("code {c}")),
                reader.stderr_tail()
            ),
        ))
    }

    async fn upload(&self, id: &str, placement: Placement) -> anyhow::Result<()> {
        // The tar is produced on a blocking thread and streamed: the agent binary (and a codex
        // binary, ~300 MB) never sits in memory whole.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
        let producer = tokio::task::spawn_blocking(move || {
            let w = ChanWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
            };
            if let Err(e) = placement.write_tar(w) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let body =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            );
        let opts = UploadToContainerOptions {
            path: PLACE_DIR.into(),
            ..Default::default()
        };
        let r = self
            .docker
            .upload_to_container(id, Some(opts), bollard::body_try_stream(body))
            .await;
        producer.await.ok();
        r.map_err(|e| anyhow::anyhow!(error_chain(&e)))
    }

    async fn exit_code(&self, id: &str) -> Option<i64> {
        let mut s = self.docker.wait_container(id, None::<WaitContainerOptions>);
        match s.next().await? {
            Ok(r) => Some(r.status_code),
            Err(bollard::errors::Error::DockerContainerWaitError { code, .. }) => Some(code),
            Err(_) => None,
        }
    }
}

/// The whole container configuration; everything but the security settings is fixed.
#[allow(clippy::too_many_arguments)]
fn container_body(
    image: &str,
    sec: &SecuritySettings,
    seccomp_json: Option<String>,
    placement: &Placement,
    stdin: bool,
    agent_bind: Option<&std::path::Path>,
    ro_binds: &[(String, String)],
    run_id: &str,
    batch_id: &str,
) -> ContainerCreateBody {
    let mut security_opt = Vec::new();
    match &sec.seccomp {
        Seccomp::EngineDefault => {}
        Seccomp::Unconfined => security_opt.push("seccomp=unconfined".to_string()),
        Seccomp::File(_) => {
            security_opt.push(format!("seccomp={}", seccomp_json.unwrap_or_default()))
        }
    }
    if sec.no_new_privileges {
        security_opt.push("no-new-privileges:true".into());
    }
    security_opt.extend(sec.security_opt.iter().cloned());
    let unmasked = sec.unmask_system_paths.then(Vec::new);
    let mut labels = HashMap::from([
        (LABEL_RUN.to_string(), run_id.to_string()),
        (LABEL_BATCH.to_string(), batch_id.to_string()),
    ]);
    if let Some(o) = Owner::current() {
        labels.insert(LABEL_OWNER.to_string(), o.label());
    }
    let mut mounts = vec![Mount {
        target: Some(PLACE_DIR.into()),
        typ: Some(MountType::VOLUME),
        ..Default::default()
    }];
    if let Some(agent) = agent_bind {
        // Nested inside the volume: the engine mounts the shallower path first.
        mounts.push(Mount {
            source: Some(agent.display().to_string()),
            target: Some(placement.spec.agent_bin.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        });
    }
    for (source, target) in ro_binds {
        mounts.push(Mount {
            source: Some(source.clone()),
            target: Some(target.clone()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        });
    }
    ContainerCreateBody {
        image: Some(image.to_string()),
        // Root inside: the agent prepares setuid copies and drops to the batch's uid itself.
        user: Some("0:0".into()),
        entrypoint: Some({
            let mut e = vec![
                placement.spec.agent_bin.display().to_string(),
                "agent".into(),
                "--batch".into(),
                placement.spec_path.clone(),
            ];
            if stdin {
                e.extend(["--unpack-stdin".into(), PLACE_DIR.into()]);
            }
            e
        }),
        cmd: Some(vec![]),
        working_dir: Some("/".into()),
        open_stdin: Some(stdin),
        stdin_once: Some(stdin),
        attach_stdin: Some(stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        labels: Some(labels),
        host_config: Some(HostConfig {
            privileged: Some(sec.privileged),
            cap_add: (!sec.cap_add.is_empty()).then(|| sec.cap_add.clone()),
            cap_drop: (!sec.cap_drop.is_empty()).then(|| sec.cap_drop.clone()),
            security_opt: (!security_opt.is_empty()).then_some(security_opt),
            readonly_rootfs: Some(sec.read_only_rootfs),
            masked_paths: unmasked.clone(),
            readonly_paths: unmasked,
            // Docker's tmpfs default is noexec,nosuid: the agent's setuid copies need both.
            tmpfs: Some(HashMap::from([(
                WORK_MOUNT.to_string(),
                "rw,exec,suid,mode=0755".to_string(),
            )])),
            mounts: Some(mounts),
            init: Some(true),
            // Scenarios need no network, and no veth pair makes a container start faster.
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Say what an engine error at start means when it is not obvious.
fn start_hint(message: String) -> String {
    if message.contains("unable to apply caps") {
        // Seen with --privileged where dockerd itself runs without CAP_SYS_RESOURCE in its
        // bounding set: runc cannot grant what it does not hold.
        return format!(
            "{message} (the engine's own capability bounding set lacks a capability this profile grants, e.g. --privileged on a host without CAP_SYS_RESOURCE; such a profile cannot run on this engine)"
        );
    }
    message
}

async fn read_seccomp(path: &std::path::Path) -> Result<String, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("failed to read seccomp profile {}: {e}", path.display()))?;
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| format!("seccomp profile {} is not JSON: {e}", path.display()))?;
    Ok(text)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The created container, removed explicitly by [`ContainerSlot::remove`], or in the
/// background by `Drop` if the batch's future is dropped half-way.
struct ContainerSlot {
    backend: DockerBackend,
    id: Arc<Mutex<Option<String>>>,
}

impl ContainerSlot {
    fn new(backend: DockerBackend) -> Self {
        ContainerSlot {
            backend,
            id: Arc::default(),
        }
    }

    fn set(&self, id: String) {
        *self.id.lock().expect("slot lock") = Some(id);
    }

    async fn remove(&self) -> anyhow::Result<()> {
        let id = self.id.lock().expect("slot lock").take();
        match id {
            Some(id) => self.backend.remove_container(&id).await,
            None => Ok(()),
        }
    }
}

impl Drop for ContainerSlot {
    fn drop(&mut self) {
        let Some(id) = self.id.lock().ok().and_then(|mut g| g.take()) else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let backend = self.backend.clone();
            rt.spawn(async move {
                let _ = backend.remove_container(&id).await;
            });
        }
        // No runtime: `sweep` on the next run removes it (it is labelled with its owner).
    }
}

/// The container part of `env` (the plan gives this backend docker environments only).
fn docker_env(env: &Environment) -> Result<&DockerEnv, BatchError> {
    env.docker().ok_or_else(|| {
        BatchError::new(
            Stage::Provision,
            format!("environment {} is not a docker environment", env.id),
        )
    })
}

const CHUNK: usize = 1 << 20;
/// The most that goes down a container's stdin rather than through the archive API (the
/// scenarios are well under 1 MB; an uploaded Codex package never qualifies).
const STDIN_PAYLOAD_MAX: u64 = 16 << 20;

/// A blocking `Write` that sends 1 MiB chunks down a channel to an async upload.
struct ChanWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChanWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(bytes::Bytes::from(chunk)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended early"))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn body_for(profile: &str, read_only: bool) -> HostConfig {
        let p = crate::matrix::profiles(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("matrix.toml"),
        )
        .expect("matrix.toml loads")
        .into_iter()
        .find(|p| p.name == profile)
        .unwrap();
        let sec = security_settings(Some(&p), read_only).unwrap();
        let spec: BatchSpec = serde_json::from_str(
            r#"{"version":1,"batch-id":"b","work-dir":"/w","uid":1000,"gid":1000,"agent-bin":"/a","cells":[]}"#,
        )
        .unwrap();
        let placement = Placement::plan(&spec);
        let body = container_body("img", &sec, None, &placement, false, None, &[], "run1", "b");
        assert_eq!(body.user.as_deref(), Some("0:0"));
        assert_eq!(body.labels.as_ref().unwrap()[LABEL_RUN], "run1");
        assert_eq!(
            body.entrypoint.as_deref().unwrap(),
            [
                "/nsmatrix/bin/nsmatrix",
                "agent",
                "--batch",
                "/nsmatrix/batch.json"
            ]
        );
        body.host_config.unwrap()
    }

    #[test]
    fn host_config_per_profile() {
        let h = body_for("default", false);
        assert_eq!(h.security_opt, None);
        assert_eq!(h.privileged, Some(false));
        assert_eq!(h.masked_paths, None);
        assert!(h.tmpfs.unwrap()[WORK_MOUNT].contains("exec,suid"));

        let h = body_for("holyclaude", true);
        assert_eq!(h.security_opt.unwrap(), ["seccomp=unconfined"]);
        assert_eq!(h.cap_add.unwrap(), ["SYS_ADMIN", "SYS_PTRACE"]);
        assert_eq!(h.readonly_rootfs, Some(true));

        let h = body_for("no-new-privileges", false);
        assert_eq!(h.security_opt.unwrap(), ["no-new-privileges:true"]);

        let h = body_for("systempaths-unconfined", false);
        assert_eq!(h.masked_paths, Some(vec![]));
        assert_eq!(h.readonly_paths, Some(vec![]));

        assert_eq!(body_for("privileged", false).privileged, Some(true));
    }

    #[test]
    fn agent_bind_mount_nests_in_the_volume() {
        let spec: BatchSpec = serde_json::from_str(
            r#"{"version":1,"batch-id":"b","work-dir":"/w","uid":0,"gid":0,"agent-bin":"/h/nsmatrix","cells":[]}"#,
        )
        .unwrap();
        let placement = Placement::plan(&spec).without_agent_upload();
        assert!(placement.entries.is_empty());
        let sec = SecuritySettings::default();
        let body = container_body(
            "img",
            &sec,
            None,
            &placement,
            true,
            Some(Path::new("/h/nsmatrix")),
            &[("/opt/codex".to_string(), "/nsmatrix/codex/0".to_string())],
            "r",
            "b",
        );
        let mounts = body.host_config.unwrap().mounts.unwrap();
        assert_eq!(mounts[0].target.as_deref(), Some(PLACE_DIR));
        assert_eq!(mounts[1].source.as_deref(), Some("/h/nsmatrix"));
        assert_eq!(mounts[1].target.as_deref(), Some("/nsmatrix/bin/nsmatrix"));
        assert_eq!(mounts[1].read_only, Some(true));
        assert_eq!(mounts[2].source.as_deref(), Some("/opt/codex"));
        assert_eq!(mounts[2].target.as_deref(), Some("/nsmatrix/codex/0"));
        assert_eq!(mounts[2].read_only, Some(true));
        // The rest of the batch comes down stdin, unpacked by the agent before it reads its spec.
        assert_eq!(body.open_stdin, Some(true));
        assert_eq!(body.stdin_once, Some(true));
        let entry = body.entrypoint.unwrap();
        assert_eq!(
            entry[entry.len() - 2..],
            ["--unpack-stdin".to_string(), PLACE_DIR.to_string()]
        );
    }
}
