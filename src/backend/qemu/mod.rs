//! [`QemuBackend`]: one QEMU guest per batch — a catalog kernel, a sysctl set, a small Debian
//! root file system with bubblewrap, and nsmatrix itself as the guest's init.

mod accel;
pub(crate) mod guest;
mod launcher;
pub mod version;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::protocol::BatchSpec;

pub(crate) use accel::test_boot;
#[cfg(test)]
pub(crate) use guest::GUEST_WORK_DIR;
pub(crate) use guest::{GuestDisks, ensure_base, ensure_rootfs, write_batch_initrd};
pub use launcher::Accel;
pub(crate) use launcher::{BOOT_ARGS, Console, Ending, Launch, watch};

use crate::artifacts::kernels::{self, Kernel};
use futures_util::future::BoxFuture;

use crate::backend::{Backend, BackendEvent, BatchCtx, BatchError, Demand, Stage, Unavailable};
use crate::matrix::model::{BackendKind, Environment};

/// vCPUs of a batch guest (`-smp`): the environment's `vcpus`, 1 by default.
pub(crate) fn guest_vcpus(env: &Environment) -> u32 {
    env.qemu().map_or(1, |q| q.vcpus.max(1))
}

/// QEMU's own resident memory beside a guest's RAM (TCG's translation buffer, devices). With
/// the RAM it bounds what a batch guest was measured to use (see docs/architecture.md).
pub(crate) const QEMU_OVERHEAD_MB: u64 = 128;

/// Lines of console kept in an error message.
const CONSOLE_TAIL_LINES: usize = 30;

#[derive(Debug, Clone)]
pub struct QemuBackend {
    pub qemu: PathBuf,
    pub accel: Accel,
    /// Why this accelerator (for `doctor`).
    pub accel_note: String,
    pub memory_mb: u32,
    /// From QEMU's start until the agent's first line.
    pub boot_timeout: Duration,
    /// QEMU's `--version` line, or why it could not be read.
    pub version: String,
}

/// Timings of one guest, for benchmarks and logs.
#[derive(Debug, Clone, Default)]
pub struct GuestTimings {
    pub provision: Duration,
    pub boot: Option<Duration>,
    pub first_result: Option<Duration>,
    pub total: Duration,
}

impl QemuBackend {
    /// Find `qemu-system-x86_64` (`$NSMATRIX_QEMU` overrides) and choose the accelerator with
    /// a test boot (cached per host).
    pub async fn probe() -> Result<QemuBackend, Unavailable> {
        let qemu = std::env::var_os("NSMATRIX_QEMU")
            .map(PathBuf::from)
            .or_else(|| find_on_path("qemu-system-x86_64"))
            .ok_or_else(|| Unavailable {
                reason: "qemu-system-x86_64 is not installed".into(),
                fix: "apt-get install qemu-system-x86".into(),
            })?;
        if find_on_path("dpkg-deb").is_none() {
            return Err(Unavailable {
                reason: "dpkg-deb is missing (needed to unpack Debian kernels and packages)".into(),
                fix: "apt-get install dpkg".into(),
            });
        }
        let probe_kernel = kernels::Catalog::builtin()
            .kernels
            .iter()
            .find_map(|k| kernels::cached(&k.name))
            .map(|k| k.vmlinuz());
        let (accel, accel_note) = accel::probe_accel(&qemu, probe_kernel.as_deref()).await;
        if accel == Accel::Tcg {
            // TCG must work, or nothing will.
            test_boot(&qemu, Accel::Tcg)
                .await
                .map_err(|e| Unavailable {
                    reason: format!("qemu cannot boot a test guest: {e}"),
                    fix: "check the qemu-system-x86 installation".into(),
                })?;
        }
        let version = version::version_line(&qemu).unwrap_or_else(|e| e);
        Ok(QemuBackend {
            qemu,
            accel,
            accel_note,
            memory_mb: 512,
            boot_timeout: Duration::from_secs(90),
            version,
        })
    }

    /// Fetch/build the kernel and assemble the guest's base initramfs (blocking work). Returns
    /// the kernel, the base initramfs and the image QEMU boots ([`guest::boot_image`]).
    pub(crate) async fn provision(
        &self,
        env: &Environment,
    ) -> anyhow::Result<(Kernel, PathBuf, PathBuf)> {
        let q = env
            .qemu()
            .with_context(|| format!("environment {} is not a qemu environment", env.id))?;
        let kernel_name = q.kernel.clone();
        let image = q.image.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Kernel, PathBuf, PathBuf)> {
            let kernel = kernels::ensure(&kernel_name)?;
            let suite = match image {
                Some(i) => i,
                None => kernels::Catalog::builtin()
                    .get(&kernel_name)?
                    .rootfs
                    .clone(),
            };
            let rootfs = ensure_rootfs(&suite, false)?;
            let base = ensure_base(&kernel, &rootfs)?;
            let boot = guest::boot_image(&kernel);
            Ok((kernel, base, boot))
        })
        .await
        .context("the provisioning task panicked")?
    }

    /// Run one batch in one guest. Events stream to `ctx.events` as the agent writes them; the
    /// console log and the raw agent output stay in `ctx.log_dir`. Also returns
    /// the guest's timings.
    pub async fn run_batch_timed(
        &self,
        env: &Environment,
        spec: BatchSpec,
        ctx: &BatchCtx,
    ) -> Result<GuestTimings, BatchError> {
        let stage = |s: Stage| {
            ctx.send(BackendEvent::StageStarted {
                batch: ctx.batch_id.clone(),
                stage: s,
            })
        };
        let done = |s: Stage, t: std::time::Instant| {
            ctx.send(BackendEvent::StageFinished {
                batch: ctx.batch_id.clone(),
                stage: s,
                elapsed: t.elapsed(),
            })
        };
        stage(Stage::Provision);
        let t = std::time::Instant::now();
        let err = |s: Stage| move |e: anyhow::Error| BatchError::new(s, format!("{e:#}"));
        std::fs::create_dir_all(&ctx.log_dir).map_err(|e| {
            BatchError::new(
                Stage::Provision,
                format!("failed to create the log dir: {e}"),
            )
        })?;
        let run_dir = RunDir::new(&ctx.run_id, &ctx.batch_id).map_err(err(Stage::Provision))?;
        let (kernel, base, boot) = self.provision(env).await.map_err(err(Stage::Provision))?;
        let initrd = run_dir.path.join("initrd.cpio");
        let (b, s, i, k) = (base.clone(), spec.clone(), initrd.clone(), kernel.clone());
        let suite = guest_suite(env);
        let disks = tokio::task::spawn_blocking(move || -> anyhow::Result<GuestDisks> {
            let mut disks = GuestDisks::for_batch(&k, &s)?;
            if s.restrictions.apparmor.is_some() {
                disks.apparmor_tools = Some(guest::ensure_apparmor_tools(&suite?)?);
            }
            write_batch_initrd(&b, &s, &disks, &i)?;
            Ok(disks)
        })
        .await
        .map_err(|e| BatchError::new(Stage::Provision, e.to_string()))?
        .map_err(err(Stage::Provision))?;
        let provision = t.elapsed();
        done(Stage::Provision, t);

        let console_log = ctx.log_dir.join("console.log");
        let results = ctx.log_dir.join("agent.jsonl");
        let _ = std::fs::remove_file(&results);
        let launch = Launch {
            qemu: self.qemu.clone(),
            accel: self.accel,
            kernel: boot,
            initrd,
            memory_mb: self.memory_mb,
            console: Console::File(console_log.clone()),
            results: Some(results),
            mode: "batch",
            disks: disks.drives(),
            vcpus: guest_vcpus(env),
        };
        stage(Stage::Start);
        let t = std::time::Instant::now();
        let mut started = false;
        let watched = watch(
            &launch,
            self.boot_timeout.min(ctx.timeout),
            ctx.timeout,
            &ctx.cancel,
            &ctx.log_dir.join("qemu.stderr"),
            |ev| {
                if !started {
                    started = true;
                    done(Stage::Start, t);
                    stage(Stage::Run);
                }
                ctx.agent_event(ev);
            },
        )
        .await;
        let run_stage = if started { Stage::Run } else { Stage::Start };
        stage(Stage::Teardown);
        let t = std::time::Instant::now();
        drop(run_dir);
        done(Stage::Teardown, t);

        let timings = GuestTimings {
            provision,
            boot: watched.boot_time,
            first_result: watched.first_result,
            total: watched.total,
        };
        let tail = || {
            let c = crate::text::tail_of_file(&console_log, CONSOLE_TAIL_LINES);
            let q = crate::text::tail_of_file(&ctx.log_dir.join("qemu.stderr"), 5);
            let mut s = format!("\n--- console tail ({}) ---\n{c}", console_log.display());
            if !q.trim().is_empty() {
                s.push_str(&format!("\n--- qemu stderr ---\n{q}"));
            }
            s
        };
        let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        match watched.ending {
            Ending::Exited {
                batch_done: true, ..
            } => Ok(timings),
            Ending::Exited { status, .. } => Err(BatchError::new(
                run_stage,
                format!(
                    "the guest stopped before the batch finished (qemu {status}){}",
                    tail()
                ),
            )),
            Ending::Panic => Err(BatchError::new(
                run_stage,
                format!("the guest kernel panicked{}", tail()),
            )),
            Ending::BootTimeout => Err(BatchError::new(
                Stage::Start,
                format!(
                    "the guest's agent did not start within {}{}",
                    secs(self.boot_timeout.min(ctx.timeout)),
                    tail()
                ),
            )),
            Ending::BatchTimeout => Err(BatchError::new(
                run_stage,
                format!(
                    "the batch did not finish within {}{}",
                    secs(ctx.timeout),
                    tail()
                ),
            )),
            Ending::Cancelled => Err(BatchError::new(run_stage, "cancelled")),
            Ending::SpawnFailed(m) => Err(BatchError::new(Stage::Start, m)),
        }
    }

    /// The reference a batch's boot is measured against: the same kernel, base initramfs
    /// (root file system and modules) and QEMU flags, with a two-line init in place of the
    /// agent that ends the guest at once. Returns QEMU's start to its exit.
    pub async fn bare_boot(&self, kernel_name: &str) -> anyhow::Result<Duration> {
        let env = Environment {
            id: format!("bare-{kernel_name}"),
            name: "bare".into(),
            axes: Default::default(),
            uid: 0,
            kind: crate::matrix::model::EnvKind::Qemu(crate::matrix::model::QemuEnv {
                kernel: kernel_name.into(),
                image: None,
                sysctls: Default::default(),
                profile: None,
                apparmor: crate::artifacts::apparmor::NONE.into(),
                vcpus: 1,
            }),
        };
        let (_, base, boot) = self.provision(&env).await?;
        let run_dir = RunDir::new("bare", kernel_name)?;
        let initrd = run_dir.path.join("initrd.cpio");
        guest::write_bare_initrd(&base, &initrd)?;
        let console = run_dir.path.join("console.log");
        let launch = Launch {
            qemu: self.qemu.clone(),
            accel: self.accel,
            kernel: boot,
            initrd,
            memory_mb: self.memory_mb,
            console: Console::File(console.clone()),
            results: None,
            mode: "bare",
            disks: Vec::new(),
            vcpus: 1,
        };
        let t = std::time::Instant::now();
        let run = tokio::process::Command::new(&self.qemu)
            .args(launch.argv())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        let status = tokio::time::timeout(self.boot_timeout, run)
            .await
            .map_err(|_| anyhow::anyhow!("the bare boot of {kernel_name} did not end"))?
            .context("failed to start qemu")?;
        let took = t.elapsed();
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        anyhow::ensure!(
            status.success() && log.contains(guest::BARE_MARK),
            "the bare boot of {kernel_name} did not reach its init ({status}); console:\n{}",
            crate::text::tail_of_file(&console, CONSOLE_TAIL_LINES)
        );
        Ok(took)
    }

    /// Boot `env` with `spec`'s sysctls applied and give an interactive shell as `spec.uid` on
    /// this terminal (`nsmatrix shell CELL`). Returns when the guest powers off.
    pub(crate) async fn shell(&self, env: &Environment, spec: BatchSpec) -> anyhow::Result<()> {
        let run_dir = RunDir::new("shell", &spec.batch_id)?;
        let (kernel, base, boot) = self.provision(env).await?;
        let initrd = run_dir.path.join("initrd.cpio");
        let mut disks = GuestDisks::for_batch(&kernel, &spec)?;
        if spec.restrictions.apparmor.is_some() {
            disks.apparmor_tools = Some(guest::ensure_apparmor_tools(&guest_suite(env)?)?);
        }
        write_batch_initrd(&base, &spec, &disks, &initrd)?;
        let launch = Launch {
            qemu: self.qemu.clone(),
            accel: self.accel,
            kernel: boot,
            initrd,
            memory_mb: self.memory_mb,
            console: Console::Stdio,
            results: None,
            mode: "shell",
            disks: disks.drives(),
            vcpus: guest_vcpus(env),
        };
        let status = tokio::process::Command::new(&self.qemu)
            .args(launch.argv())
            .kill_on_drop(true)
            .status()
            .await
            .context("failed to start qemu")?;
        drop(run_dir);
        anyhow::ensure!(status.success(), "qemu exited with {status}");
        Ok(())
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    /// A guest holds one job slot per vCPU (under TCG a vCPU keeps one host core busy) and its
    /// RAM plus QEMU's own resident memory.
    fn demand(&self, env: &Environment) -> Demand {
        Demand {
            cpus: guest_vcpus(env),
            memory_mb: u64::from(self.memory_mb) + QEMU_OVERHEAD_MB,
            group: None,
        }
    }

    /// Only a guest's agent writes sysctls (elsewhere they are the host's, checked, never set);
    /// every cell needs the set's keys to exist.
    fn prepare(&self, _run_id: &str, env: &Environment, mut spec: BatchSpec) -> BatchSpec {
        let sysctls = env.qemu().map(|q| q.sysctls.clone()).unwrap_or_default();
        for c in &mut spec.cells {
            c.needs_sysctls = sysctls.keys().cloned().collect();
        }
        spec.sysctls = sysctls;
        // The profile's process-level restrictions, applied by the guest's agent (root at
        // init) exactly as the host backend's agent applies them.
        spec.restrictions = crate::backend::host::HostBackend::restrictions(
            env.qemu().and_then(|q| q.profile.as_ref()),
        );
        spec.restrictions.apparmor = env
            .qemu()
            .and_then(|q| crate::artifacts::apparmor::policy(&q.apparmor));
        spec
    }

    fn run_batch<'a>(
        &'a self,
        env: &'a Environment,
        spec: BatchSpec,
        ctx: &'a BatchCtx,
    ) -> BoxFuture<'a, Result<(), BatchError>> {
        Box::pin(async move { self.run_batch_timed(env, spec, ctx).await.map(|_| ()) })
    }

    /// A guest's directory goes with its batch (also when the batch's task is dropped, which
    /// kills its qemu); after a second Ctrl-C this removes those of this run that remain.
    fn end_run<'a>(&'a self, run_id: &'a str, _abort: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move { RunDir::remove_run(run_id) })
    }

    fn notes(&self) -> Vec<String> {
        version::notes(self.accel, &self.qemu, &self.version)
    }

    fn describe(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "qemu".into(),
                format!("{} ({})", self.version, self.qemu.display()),
            ),
            (
                "/dev/kvm".into(),
                if Path::new("/dev/kvm").exists() {
                    "present".into()
                } else {
                    "absent: guests run under TCG".into()
                },
            ),
            // The probe boots a real cached kernel under KVM with a timeout (guests can hang
            // here where a boot sector does not) and caches the answer per host.
            ("qemu acceleration".into(), self.accel_note.clone()),
        ];
        rows.extend(self.notes().into_iter().map(|n| ("qemu speed".into(), n)));
        rows
    }
}

/// The Debian suite of a qemu environment's root file system (its `image`, else its kernel's
/// catalog entry's).
fn guest_suite(env: &Environment) -> anyhow::Result<String> {
    let q = env
        .qemu()
        .with_context(|| format!("environment {} is not a qemu environment", env.id))?;
    Ok(match &q.image {
        Some(i) => i.clone(),
        None => kernels::Catalog::builtin().get(&q.kernel)?.rootfs.clone(),
    })
}

/// A per-run directory for a guest's files, removed when dropped (on every path).
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn new(run_id: &str, batch_id: &str) -> anyhow::Result<RunDir> {
        let path = Self::root().join(format!(
            "{}-{}-{}",
            safe(run_id),
            safe(batch_id),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl RunDir {
    fn root() -> PathBuf {
        std::env::temp_dir().join("nsmatrix-qemu")
    }

    /// Remove every guest directory of `run_id` made by this process.
    fn remove_run(run_id: &str) {
        let prefix = format!("{}-", safe(run_id));
        let suffix = format!("-{}", std::process::id());
        let Ok(rd) = std::fs::read_dir(Self::root()) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(&suffix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A run or batch id as a file name.
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
