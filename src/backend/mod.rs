//! Backends start an environment, place the agent and the scenarios, run `nsmatrix agent` on a
//! batch, stream its events back and clean up. They know nothing of scenarios' content.
//!
//! [`Backend`] is the one interface the plan, the scheduler and `doctor` use; [`Registry`]
//! probes the kinds a run needs and is the only place that names every kind.

pub mod docker;
mod events;
pub mod guest_docker;
pub mod host;
pub mod qemu;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;

pub(crate) use events::Stages;
pub use events::{BackendEvent, BatchCtx, BatchError, Stage, Unavailable};

use crate::matrix::model::{BackendKind, EnvKind, Environment, Settings};
use crate::protocol::BatchSpec;

/// Where a batch's work dir goes in a spec before a backend places it (a container's tmpfs, a
/// guest's disk); the host backend puts it under its run directory instead.
pub(crate) const DEFAULT_WORK_ROOT: &str = "/nsmatrix-work";

/// One kind of environment, probed and ready. Implementations own everything they create and
/// remove it on every path.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// What one batch of `env` holds while it runs: the scheduler starts it only when that
    /// much is free (a process or a container: one job slot and no memory to speak of).
    fn demand(&self, _env: &Environment) -> Demand {
        Demand::PROCESS
    }

    /// Add this backend's part to a batch spec (restrictions, sysctls, work dir).
    fn prepare(&self, _run_id: &str, _env: &Environment, spec: BatchSpec) -> BatchSpec {
        spec
    }

    /// Before the run's first batch: remove leftovers of killed runs, claim this run's space.
    fn begin_run<'a>(&'a self, _run_id: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Run one batch, streaming its events to `ctx.events`, and remove what it created.
    fn run_batch<'a>(
        &'a self,
        env: &'a Environment,
        spec: BatchSpec,
        ctx: &'a BatchCtx,
    ) -> BoxFuture<'a, Result<(), BatchError>>;

    /// After the run: remove what its batches should have removed themselves (a fallback).
    /// With `abort` (a second Ctrl-C), also what batches still running own.
    fn end_run<'a>(&'a self, _run_id: &'a str, _abort: bool) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// (fact, value) rows for `nsmatrix doctor`.
    fn describe(&self) -> Vec<(String, String)>;

    /// What a run should tell its user before this backend's first batch: a setup that works
    /// but costs time, with its fix (an old QEMU under TCG).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a batch holds while it runs, weighed against the machine: `--jobs` slots (one per core
/// by default) and the memory that was available when the run started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// Job slots: a process or a container takes one, a guest one per vCPU.
    pub cpus: u32,
    /// Memory it keeps resident (a guest's RAM and QEMU's own), in MiB.
    pub memory_mb: u64,
    /// Batches sharing one resource that runs them one after another (the containers of one
    /// engine guest share its vCPUs): its key and how many may run at once.
    pub group: Option<(String, u32)>,
}

impl Demand {
    pub const PROCESS: Demand = Demand {
        cpus: 1,
        memory_mb: 0,
        group: None,
    };
}

/// Estimated cost of a batch in milliseconds: starting its environment plus its bwrap cells
/// and its Codex cells, for `--shard` (it must not depend on what this machine offers, so
/// every shard agrees). Measured on this project's machines (2026-11-30): a host batch starts
/// in ~0.1 s and runs a bwrap cell in ~10 ms; a container starts in ~1.5 s and execs a cell in
/// ~50 ms; a QEMU guest boots in 4-7 s (TCG, PVH); a container in an engine guest starts in
/// 4.5-7 s and runs a bwrap cell in 0.05-0.6 s, its guest's boot (10-14 s to a ready engine)
/// shared by every container of its kernel. A Codex cell (two or three starts of a 300 MB
/// binary, its bwrap probes) takes ~0.1 s natively and 1-4 s under TCG.
pub(crate) fn estimated_cost_ms(kind: BackendKind, bwrap_cells: usize, codex_cells: usize) -> u64 {
    let (start, per_cell, per_codex_cell) = match kind {
        BackendKind::Host => (100, 10, 100),
        BackendKind::Docker => (1_500, 50, 180),
        BackendKind::Qemu => (6_000, 50, 2_500),
        BackendKind::GuestDocker => (6_000, 300, 2_500),
    };
    start + per_cell * bwrap_cells as u64 + per_codex_cell * codex_cells as u64
}

/// Every kind, in `doctor`'s order.
pub(crate) const KINDS: [BackendKind; 4] = [
    BackendKind::Host,
    BackendKind::Docker,
    BackendKind::Qemu,
    BackendKind::GuestDocker,
];

/// Why cells of `env` cannot run on this machine whatever its backend's state: a host fact
/// the environment needs and cannot set itself (the SKIP reason). Checked before availability.
pub(crate) fn host_check(env: &Environment) -> Option<String> {
    match &env.kind {
        EnvKind::Docker(d) => docker::host_sysctl_mismatch(&d.sysctls),
        EnvKind::Host(_) | EnvKind::Qemu(_) | EnvKind::GuestDocker(_) => None,
    }
}

/// Probe one kind.
async fn probe(kind: BackendKind, settings: &Settings) -> Result<Arc<dyn Backend>, Unavailable> {
    Ok(match kind {
        BackendKind::Host => Arc::new(host::HostBackend::probe(settings)?),
        BackendKind::Docker => Arc::new(docker::connect().await?),
        BackendKind::Qemu => Arc::new(qemu::QemuBackend::probe().await?),
        BackendKind::GuestDocker => Arc::new(guest_docker::GuestDockerBackend::probe().await?),
    })
}

/// The backends of one run (or of `doctor`), each probed once.
pub struct Registry {
    probed: BTreeMap<BackendKind, Result<Arc<dyn Backend>, Unavailable>>,
}

impl Registry {
    /// Probe `kinds` only (no Docker connection for a host-only run).
    pub async fn probe(kinds: &[BackendKind], settings: &Settings) -> Registry {
        let mut probed = BTreeMap::new();
        for &k in kinds {
            probed.insert(k, probe(k, settings).await);
        }
        Registry { probed }
    }

    pub fn get(&self, kind: BackendKind) -> Result<&Arc<dyn Backend>, Unavailable> {
        match self.probed.get(&kind) {
            Some(Ok(b)) => Ok(b),
            Some(Err(u)) => Err(u.clone()),
            None => Err(Unavailable {
                reason: "not used by this run".into(),
                fix: String::new(),
            }),
        }
    }

    /// Why a backend cannot run cells here, if it cannot.
    pub fn unavailable(&self, kind: BackendKind) -> Option<Unavailable> {
        self.get(kind).err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_orders_backends() {
        assert!(
            estimated_cost_ms(BackendKind::Qemu, 3, 0)
                > estimated_cost_ms(BackendKind::Docker, 3, 0)
        );
        assert!(
            estimated_cost_ms(BackendKind::Docker, 3, 0)
                > estimated_cost_ms(BackendKind::Host, 3, 0)
        );
        // Under TCG a Codex cell costs seconds, not a bwrap cell's tens of milliseconds.
        assert!(
            estimated_cost_ms(BackendKind::Qemu, 0, 3)
                > estimated_cost_ms(BackendKind::Qemu, 30, 0)
        );
    }
}
