//! `nsmatrix kernels` and `nsmatrix shell`: the commands around environments that are not a
//! run (kept apart from `cli.rs`, which holds the run-centred ones).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::matrix::model::BackendKind;
use crate::{exit, matrix};

#[derive(Args, Debug, Clone)]
#[command(
    about = "List, fetch or build the kernels QEMU guests boot",
    long_about = "Kernels come from vm-images/kernels.toml: Debian's packages fetched from the \
                  mirror ($NSMATRIX_DEBIAN_MIRROR, checksums from the suite's index verified) or \
                  built from linux-source with a config fragment kept in the repo. All are cached \
                  by content under the cache directory.",
    after_help = "Examples:\n  nsmatrix kernels list\n  nsmatrix kernels fetch debian-6.1\n  nsmatrix kernels build nouserns-6.1"
)]
pub struct KernelsArgs {
    #[command(subcommand)]
    pub action: KernelsAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum KernelsAction {
    /// What is cached, and what each kernel supports (CONFIG_USER_NS, userns sysctls).
    List {
        /// Also Moby's check-config.sh run against each cached kernel's config (kept).
        #[arg(long)]
        verbose: bool,
    },
    /// Fetch (or build, for source kernels) the named kernels.
    Fetch { names: Vec<String> },
    /// Build a source kernel (same as fetch for it).
    Build { names: Vec<String> },
}

pub fn kernels(a: KernelsArgs) -> u8 {
    use crate::artifacts::kernels;
    match a.action {
        KernelsAction::List { verbose } => {
            let rows = kernels::list();
            print!("{}", kernels::render_list(&rows));
            if verbose {
                crate::backend::guest_docker::engine::check_config::print_verbose(&rows);
            }
            exit::OK
        }
        KernelsAction::Fetch { names } | KernelsAction::Build { names } => {
            if names.is_empty() {
                eprintln!(
                    "nsmatrix kernels: name at least one kernel (see `nsmatrix kernels list`)"
                );
                return exit::BAD_INPUT;
            }
            for n in names {
                match kernels::ensure(&n) {
                    Ok(k) => println!(
                        "{n}: {} ({}), CONFIG_USER_NS={}, sysctls: {}, in {}",
                        k.facts.release,
                        k.facts.origin,
                        if k.facts.user_ns { "y" } else { "n" },
                        if k.facts.sysctls.is_empty() {
                            "none".to_string()
                        } else {
                            k.facts.sysctls.join(", ")
                        },
                        k.dir.display()
                    ),
                    Err(e) => {
                        eprintln!("nsmatrix kernels: {n}: {e:#}");
                        return exit::ERRORS;
                    }
                }
            }
            exit::OK
        }
    }
}

#[derive(Args, Debug, Clone)]
#[command(
    about = "Open a shell in a cell's environment, with its restrictions, as its unprivileged user",
    long_about = "Boots the cell's QEMU guest (its kernel and sysctls applied) or starts a host \
                  shell under the cell's profile (seccomp filter, bounding set, user-namespace \
                  limit, no-new-privileges), as the cell's uid, for reproducing an incident by \
                  hand. In a guest a setuid copy of bwrap is at /usr/local/bin/bwrap-setuid; \
                  exiting the shell powers the guest off.",
    after_help = "Examples:\n  nsmatrix shell 'host-seccomp-deny-userns/bwrap-system+codex/core/add_file'\n  nsmatrix shell 'qemu-nouserns-6.1-*/bwrap-system+setuid+codex/*/add_file'"
)]
pub struct ShellArgs {
    /// A cell id, or a glob matching exactly one cell's environment.
    pub cell: String,
    #[arg(long, default_value = "matrix.toml")]
    pub matrix: PathBuf,
}

pub fn shell(a: ShellArgs) -> u8 {
    let m = match matrix::load(&a.matrix) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return exit::BAD_INPUT;
        }
    };
    let filter = match matrix::Filter::parse(std::slice::from_ref(&a.cell)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nsmatrix shell: {e}");
            return exit::BAD_INPUT;
        }
    };
    let cells: Vec<_> = m
        .cells
        .iter()
        .filter(|c| filter.matches(c))
        .cloned()
        .collect();
    let mut envs: Vec<&str> = cells.iter().map(|c| c.env.id.as_str()).collect();
    envs.dedup();
    let [env_id] = envs.as_slice() else {
        eprintln!(
            "nsmatrix shell: `{}` matches {} environments ({}); name one cell",
            a.cell,
            envs.len(),
            envs.iter().take(5).copied().collect::<Vec<_>>().join(", ")
        );
        return exit::BAD_INPUT;
    };
    let cell = cells
        .iter()
        .find(|c| c.env.id == *env_id)
        .expect("one env")
        .clone();
    match cell.env.backend() {
        BackendKind::Host => host_shell(&cell),
        BackendKind::Qemu => {
            let Some(rt) = crate::run::runtime() else {
                return exit::ERRORS;
            };
            rt.block_on(async {
                let q = match crate::backend::qemu::QemuBackend::probe().await {
                    Ok(q) => q,
                    Err(u) => {
                        eprintln!("nsmatrix shell: {u}");
                        return exit::ERRORS;
                    }
                };
                let exe = std::env::current_exe().unwrap_or_default();
                let base = crate::plan::base_spec(
                    "shell",
                    &cell.env,
                    std::slice::from_ref(&cell),
                    &exe,
                    m.settings.cell_timeout,
                );
                let mut spec = crate::backend::Backend::prepare(&q, "shell", &cell.env, base);
                // A Codex cell's package comes along (mounted at /opt/codex/VERSION).
                for c in &mut spec.cells {
                    if let crate::protocol::SubjectSpec::Codex {
                        version, codex_bin, ..
                    } = &mut c.subject
                    {
                        match crate::artifacts::npm::codex_package(version) {
                            Ok(p) => *codex_bin = p.codex,
                            Err(e) => {
                                eprintln!("nsmatrix shell: Codex CLI {version}: {e:#}");
                                return exit::ERRORS;
                            }
                        }
                    }
                }
                match q.shell(&cell.env, spec).await {
                    Ok(()) => exit::OK,
                    Err(e) => {
                        eprintln!("nsmatrix shell: {e:#}");
                        exit::ERRORS
                    }
                }
            })
        }
        other => {
            eprintln!(
                "nsmatrix shell: {} environments are not supported yet; run the image with the profile's settings by hand (see docs/matrix.md)",
                other.as_str()
            );
            exit::ERRORS
        }
    }
}

/// A shell under the cell's host restrictions, as its uid, in the current directory.
fn host_shell(cell: &crate::matrix::model::Cell) -> u8 {
    let profile = cell.env.host().and_then(|h| h.profile.as_ref());
    let r = crate::backend::host::HostBackend::restrictions(profile);
    let prepared = match crate::sandbox::restrict::Prepared::new(&r, cell.env.uid, cell.env.uid) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nsmatrix shell: {e}");
            return exit::BAD_INPUT;
        }
    };
    eprintln!(
        "nsmatrix shell: uid {} under profile `{}`; bwrap is on PATH as usual; exit to leave",
        cell.env.uid,
        profile.map(|p| p.name.as_str()).unwrap_or("none")
    );
    // Inside the profile's outer sandbox too, as a cell's program starts.
    let (program, args) =
        match crate::sandbox::restrict::wrap_outer(&r, std::path::Path::new("/bin/sh"), &[]) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("nsmatrix shell: {e}");
                return exit::BAD_INPUT;
            }
        };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env("PS1", format!("[nsmatrix {}] $ ", cell.env.id));
    prepared.apply_to(&mut cmd);
    match cmd.status() {
        Ok(s) => u8::try_from(s.code().unwrap_or(1)).unwrap_or(1),
        Err(e) => {
            eprintln!("nsmatrix shell: failed to start /bin/sh: {e}");
            exit::ERRORS
        }
    }
}
