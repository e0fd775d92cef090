//! The guest-docker backend: containers of a Docker engine that runs inside a QEMU guest of a
//! chosen kernel. It is the qemu layer under the docker layer: one guest boot
//! (`engine`) per kernel × sysctl set serves every container of that kernel × sysctl
//! set, and each batch is a container that [`DockerBackend::run_batch`] runs against the
//! guest's engine exactly as against a local one (the scenarios uploaded, since the guest does
//! not share this machine's files; the agent is the guest's copy of its own init, the same
//! build, bind-mounted read-only).
//!
//! The images come from this machine's engine (built there without a registry) through the
//! cached engine data disk used copy-on-write; the Codex package is a read-only disk of the
//! guest that containers bind-mount. A guest is powered off when the last batch the plan gave
//! it has ended, and at the end of the run in any case (Ctrl-C included); an engine that does
//! not start makes every batch of its kernel × sysctl set ERROR with the guest console's tail
//! (which holds dockerd's own log), once, without a boot per batch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::docker::{self, AgentPlacement, DockerBackend};
use super::{Backend, BatchCtx, BatchError, Demand, Stage, Stages, Unavailable};
pub mod engine;

use self::engine::{self as guest_engine, EngineOptions, GUEST_CODEX_DIR, GuestEngine};
use crate::matrix::model::{BackendKind, Environment};
use crate::protocol::{BatchSpec, SubjectSpec};

/// Containers in engine guests. Cheap to share: the guests live in `inner`.
pub struct GuestDockerBackend {
    inner: Arc<Inner>,
    /// The run's note on this machine's QEMU (see [`Backend::notes`]).
    qemu_notes: Vec<String>,
}

struct Inner {
    /// This machine's engine: it builds (or finds) the images the guests' data disks hold.
    host: DockerBackend,
    /// One slot per kernel × sysctl set of the run.
    slots: Mutex<BTreeMap<String, Arc<Slot>>>,
}

/// One kernel × sysctl set × AppArmor: what its guest must hold and, once booted, the guest.
struct Slot {
    kernel: String,
    sysctls: BTreeMap<String, String>,
    apparmor: bool,
    want: Mutex<Want>,
    /// Held while the guest boots, so batches of the same slot wait for one boot.
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct Want {
    /// One environment per image the guest's engine needs.
    images: BTreeMap<String, Environment>,
    /// Codex version → its binary on this machine (the first one gets the guest's disk).
    codex: BTreeMap<String, PathBuf>,
    /// Batches the plan gave this slot that have not ended.
    pending: usize,
}

#[derive(Default)]
struct State {
    guest: Option<Running>,
    /// The engine did not start: every batch of the slot gets this instead of another boot.
    failed: Option<String>,
    /// Batches using the guest now.
    users: usize,
}

struct Running {
    engine: GuestEngine,
    docker: DockerBackend,
}

impl GuestDockerBackend {
    /// Available where QEMU is installed and this machine's Docker engine answers (the images
    /// are built there and saved into the guests' data disks).
    pub async fn probe() -> Result<GuestDockerBackend, Unavailable> {
        let qemu = guest_engine::qemu_binary();
        let found = if qemu.is_absolute() {
            qemu.exists().then(|| qemu.clone())
        } else {
            crate::backend::qemu::find_on_path(&qemu.to_string_lossy())
        };
        let Some(qemu) = found else {
            return Err(Unavailable {
                reason: format!("{} is not installed", qemu.display()),
                fix: "apt-get install qemu-system-x86".into(),
            });
        };
        let qemu_notes = crate::backend::qemu::version::version_line(&qemu)
            .map(|line| {
                crate::backend::qemu::version::notes(guest_engine::choose_accel().0, &qemu, &line)
            })
            .unwrap_or_default();
        let host = docker::connect().await.map_err(|u| Unavailable {
            reason: format!(
                "the images of engine guests come from this machine's Docker engine: {}",
                u.reason
            ),
            fix: u.fix,
        })?;
        Ok(GuestDockerBackend {
            inner: Arc::new(Inner {
                host,
                slots: Mutex::new(BTreeMap::new()),
            }),
            qemu_notes,
        })
    }
}

impl Inner {
    fn slot(&self, env: &Environment) -> Option<Arc<Slot>> {
        let g = env.guest_docker()?;
        let mut slots = self.slots.lock().expect("slots lock");
        Some(
            slots
                .entry(g.guest_key())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        kernel: g.kernel.clone(),
                        sysctls: g.sysctls.clone(),
                        apparmor: g.apparmor,
                        want: Mutex::default(),
                        state: tokio::sync::Mutex::default(),
                    })
                })
                .clone(),
        )
    }

    /// The guest's engine as a Docker backend, booting the guest first if it is not running.
    async fn acquire(self: Arc<Self>, slot: Arc<Slot>) -> Result<DockerBackend, String> {
        let mut st = slot.state.lock().await;
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        if st.guest.is_none() {
            match self.boot(&slot).await {
                Ok(r) => st.guest = Some(r),
                Err(e) => {
                    st.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        st.users += 1;
        Ok(st.guest.as_ref().expect("booted").docker.clone())
    }

    async fn boot(&self, slot: &Slot) -> Result<Running, String> {
        let (envs, codex): (Vec<Environment>, Option<(String, PathBuf)>) = {
            let w = slot.want.lock().expect("want lock");
            (
                w.images.values().cloned().collect(),
                w.codex.iter().next().map(|(v, p)| (v.clone(), p.clone())),
            )
        };
        let mut refs = Vec::new();
        for env in &envs {
            let r = self.host.provision(env).await.map_err(|e| {
                format!(
                    "the image of {} for the {} guest: {}",
                    env.id, slot.kernel, e.message
                )
            })?;
            if !refs.contains(&r) {
                refs.push(r);
            }
        }
        let mut opts = EngineOptions::new(&slot.kernel);
        opts.sysctls = slot.sysctls.clone();
        opts.apparmor = slot.apparmor;
        opts.codex = codex.as_ref().map(|(v, _)| v.clone());
        let (engine, _disk) = guest_engine::data::start_with_images(opts, &refs)
            .await
            .map_err(|e| {
                format!(
                    "the Docker engine in a guest of {} did not start (dockerd's own log is on the guest's console): {e:#}",
                    slot.kernel
                )
            })?;
        let mut docker = match docker::connect_to(Some(engine.endpoint.clone())).await {
            Ok(d) => d
                .with_agent_placement(AgentPlacement::Upload)
                .with_agent_in_engine(PathBuf::from(guest_engine::GUEST_AGENT_COPY))
                .with_kernel_log(PathBuf::from(guest_engine::GUEST_KERNEL_LOG)),
            Err(u) => {
                let tail = engine.shutdown().await.unwrap_or_default();
                return Err(format!(
                    "the Docker engine in a guest of {} does not answer: {u}; console tail:\n{tail}",
                    slot.kernel
                ));
            }
        };
        if let Some((_, host_bin)) = codex {
            docker = docker.with_codex_mount(host_bin, GUEST_CODEX_DIR.to_string());
        }
        eprintln!(
            "nsmatrix: engine guest of {} ready in {:.1} s ({}, user namespaces for root: {})",
            slot.kernel,
            engine.timings.ready.as_secs_f64(),
            engine.endpoint,
            engine.userns_probe
        );
        Ok(Running { engine, docker })
    }

    /// A batch of `slot` ended: power its guest off when no batch needs it any more.
    async fn release(&self, slot: &Slot) {
        let mut st = slot.state.lock().await;
        st.users = st.users.saturating_sub(1);
        let pending = {
            let mut w = slot.want.lock().expect("want lock");
            w.pending = w.pending.saturating_sub(1);
            w.pending
        };
        if st.users == 0
            && pending == 0
            && let Some(r) = st.guest.take()
        {
            shut_down(r).await;
        }
    }
}

async fn shut_down(r: Running) {
    let kernel = r.engine.kernel.name.clone();
    if let Err(e) = r.engine.shutdown().await {
        eprintln!("nsmatrix: failed to remove the engine guest of {kernel}: {e:#}");
    }
}

impl Backend for GuestDockerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::GuestDocker
    }

    /// A container runs on its engine guest's one vCPU: one job slot, the guest's memory while
    /// it runs, and one batch of a guest at a time (two would share the one vCPU, leaving a
    /// host core idle).
    fn demand(&self, env: &Environment) -> Demand {
        Demand {
            cpus: 1,
            memory_mb: u64::from(EngineOptions::new("").memory_mb)
                + crate::backend::qemu::QEMU_OVERHEAD_MB,
            group: env.guest_docker().map(|g| (g.guest_key(), 1)),
        }
    }

    /// Records what the environment's guest must hold (its image, the Codex package) and
    /// that one more batch will use it.
    fn prepare(&self, _run_id: &str, env: &Environment, spec: BatchSpec) -> BatchSpec {
        if let (Some(slot), Some(d)) = (self.inner.slot(env), env.docker()) {
            let mut w = slot.want.lock().expect("want lock");
            w.images
                .entry(d.image.clone())
                .or_insert_with(|| env.clone());
            for c in &spec.cells {
                if let SubjectSpec::Codex {
                    version, codex_bin, ..
                } = &c.subject
                {
                    w.codex
                        .entry(version.clone())
                        .or_insert_with(|| codex_bin.clone());
                }
            }
            w.pending += 1;
        }
        spec
    }

    /// Guests of runs that were killed: their QEMU and overlays go.
    fn begin_run<'a>(&'a self, _run_id: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async {
            let n = guest_engine::sweep_stale_runs();
            if n > 0 {
                eprintln!("nsmatrix: removed {n} leftover engine guest(s) of earlier runs");
            }
            Ok(())
        })
    }

    fn run_batch<'a>(
        &'a self,
        env: &'a Environment,
        spec: BatchSpec,
        ctx: &'a BatchCtx,
    ) -> BoxFuture<'a, Result<(), BatchError>> {
        Box::pin(async move {
            let Some(slot) = self.inner.slot(env) else {
                return Err(BatchError::new(
                    Stage::Provision,
                    format!("environment {} is not a guest-docker environment", env.id),
                ));
            };
            let stages = Stages::new(ctx);
            stages.start(Stage::Provision);
            // The boot runs on its own task: a batch cancelled meanwhile leaves the guest to
            // the slot, which `end_run` powers off.
            let boot = tokio::spawn(self.inner.clone().acquire(slot.clone()));
            let docker = tokio::select! {
                r = boot => r.unwrap_or_else(|e| Err(format!("the guest's boot task failed: {e}"))),
                _ = ctx.cancel.cancelled() => Err("cancelled".to_string()),
            };
            stages.finish(Stage::Provision);
            let docker = match docker {
                Ok(d) => d,
                Err(e) => {
                    let mut w = slot.want.lock().expect("want lock");
                    w.pending = w.pending.saturating_sub(1);
                    return Err(BatchError::new(Stage::Provision, e));
                }
            };
            let r = docker.run_batch(env, spec, ctx).await;
            self.inner.release(&slot).await;
            r
        })
    }

    /// Every guest still running is powered off (their containers go with them).
    fn end_run<'a>(&'a self, _run_id: &'a str, _abort: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let slots: Vec<Arc<Slot>> = self
                .inner
                .slots
                .lock()
                .expect("slots lock")
                .values()
                .cloned()
                .collect();
            for slot in slots {
                let mut st = slot.state.lock().await;
                if let Some(r) = st.guest.take() {
                    shut_down(r).await;
                }
                st.users = 0;
            }
        })
    }

    fn notes(&self) -> Vec<String> {
        self.qemu_notes.clone()
    }

    fn describe(&self) -> Vec<(String, String)> {
        let e = self.inner.host.engine();
        let mut rows = vec![(
            "guest-docker".into(),
            format!(
                "Docker engines in QEMU guests of catalog kernels (TCG), their images from the engine at {}",
                e.endpoint
            ),
        )];
        rows.extend(self.notes().into_iter().map(|n| ("qemu speed".into(), n)));
        rows
    }
}
