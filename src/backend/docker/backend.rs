//! [`DockerBackend`] as a [`Backend`]: what the plan, the scheduler and `doctor` see of it.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;

use super::client::DockerBackend;
use crate::backend::{Backend, BatchCtx, BatchError};
use crate::matrix::model::{BackendKind, Environment};
use crate::protocol::BatchSpec;

impl Backend for DockerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Docker
    }

    /// Containers of earlier runs that were killed before they could clean up.
    fn begin_run<'a>(&'a self, _run_id: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async {
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => eprintln!("nsmatrix: removed {n} leftover container(s) of earlier runs"),
                Err(e) => eprintln!("nsmatrix: failed to sweep leftover containers: {e:#}"),
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
        Box::pin(DockerBackend::run_batch(self, env, spec, ctx))
    }

    /// Every batch removes its container itself; after a second Ctrl-C batches are still
    /// running, so every container labelled with this run goes.
    fn end_run<'a>(&'a self, run_id: &'a str, abort: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if abort && let Err(e) = self.remove_run(run_id).await {
                eprintln!("nsmatrix: failed to remove this run's containers: {e:#}");
            }
        })
    }

    fn describe(&self) -> Vec<(String, String)> {
        let e = self.engine();
        vec![(
            "docker".into(),
            format!(
                "engine {} (API {}) at {}",
                e.version, e.api_version, e.endpoint
            ),
        )]
    }
}

/// Docker cannot set `user.*` (or `kernel.*`) sysctls per container (runc refuses): an
/// environment that names sysctl values runs only where the host already has them. The first
/// of `want`'s sysctls whose value on this host differs, as a SKIP reason; nsmatrix never
/// changes the host's sysctls.
pub(crate) fn host_sysctl_mismatch(want: &BTreeMap<String, String>) -> Option<String> {
    for (k, v) in want {
        let path = std::path::Path::new("/proc/sys").join(k.replace('.', "/"));
        match std::fs::read_to_string(&path) {
            Ok(have) if have.trim() == v.trim() => {}
            Ok(have) => {
                return Some(format!(
                    "needs the host's {k}={v} but the host has {}; Docker cannot set it per container and nsmatrix never changes the host's sysctls (fix: run where the host has it, or use a qemu environment)",
                    have.trim()
                ));
            }
            Err(_) => {
                return Some(format!(
                    "needs the host's {k}={v} but this kernel has no such sysctl (fix: use a qemu environment)"
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_sysctls_are_checked_against_the_host_never_set() {
        let have = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap();
        let ok = BTreeMap::from([("kernel.pid_max".to_string(), have.trim().to_string())]);
        assert_eq!(host_sysctl_mismatch(&ok), None);
        let other = BTreeMap::from([("kernel.pid_max".to_string(), "1".to_string())]);
        assert!(
            host_sysctl_mismatch(&other)
                .unwrap()
                .contains("but the host has")
        );
        let missing = BTreeMap::from([("kernel.no_such_knob_here".to_string(), "0".to_string())]);
        assert!(
            host_sysctl_mismatch(&missing)
                .unwrap()
                .contains("no such sysctl")
        );
        // Unchanged by the check.
        assert_eq!(
            std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap(),
            have
        );
    }
}
