//! The nsmatrix command line: parse arguments, call one function per subcommand, map the
//! outcome to an exit code. Invoked through a symlink named `apply_patch` it is Codex's
//! `apply_patch`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nsmatrix::cli;

#[derive(Parser)]
#[command(
    name = "nsmatrix",
    version,
    about = "Which kernels, container setups and bubblewrap builds does a sandbox work on?",
    long_about = "nsmatrix runs apply_patch scenarios through bubblewrap sandboxes (as Codex CLI \
                  does) on this host, in Docker containers and in QEMU guests, and writes \
                  pass/fail, timings and a diagnosis of each failure to JUnit, Markdown and JSON.\n\n\
                  Exit codes: 0 every cell met its expectation; 1 some cell FAILed or XPASSed; \
                  2 bad input, nothing run; 3 no unexpected failure but some cells ended in ERROR; \
                  4 no unexpected failure but coverage was lost (cells of a required backend \
                  SKIPped).",
    after_help = "Examples:\n  nsmatrix doctor\n  nsmatrix list --filter backend=host\n  nsmatrix run\n  nsmatrix run --filter 'host-*/*/core/add_*' --jobs 2\n  nsmatrix diff reports/last-night reports/tonight\n  nsmatrix signoff --axis image --from bookworm --to bookworm-suid reports/tonight\n  nsmatrix signoff-image vm-images/docker/agent-1.1.5.Dockerfile vm-images/docker/agent-1.1.6.Dockerfile\n  nsmatrix merge reports/shard-* --out reports/tonight"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(cli::RunArgs),
    List(cli::ListArgs),
    Doctor(cli::DoctorArgs),
    Images(cli::ImagesArgs),
    Diff(cli::DiffArgs),
    Signoff(cli::SignoffArgs),
    #[command(name = "signoff-image")]
    SignoffImage(nsmatrix::cli_signoff_image::SignoffImageArgs),
    Merge(cli::MergeArgs),
    Kernels(nsmatrix::cli_vm::KernelsArgs),
    Shell(nsmatrix::cli_vm::ShellArgs),
    Vm(nsmatrix::cli_engine::VmArgs),
    /// Apply a patch the way Codex's apply_patch does (PATCH as argument or on stdin).
    #[command(
        name = "apply-patch",
        after_help = "Example:\n  nsmatrix apply-patch \"$(cat scenarios/add_file/patch.txt)\""
    )]
    ApplyPatch {
        /// The patch text; read from stdin when absent.
        #[arg(allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// Internal: run one batch of cells inside an environment (JSON lines on stdout).
    #[command(hide = true)]
    Agent {
        /// The batch spec (JSON); `-` for stdin.
        #[arg(long)]
        batch: PathBuf,
        /// First unpack a tar read from stdin into this directory (the batch's files, sent
        /// down a container's attached stdin instead of through the engine's archive API).
        #[arg(long, value_name = "DIR")]
        unpack_stdin: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // PID 1 of a QEMU guest (never of a container): mount, run the batch, power off.
    if nsmatrix::agent::init::is_guest_init() {
        nsmatrix::agent::init::main();
    }
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    if Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == "apply_patch")
    {
        let rest: Vec<OsString> = args.collect();
        return ExitCode::from(apply_patch_main(&rest));
    }
    if Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == nsmatrix::agent::witness::NAME)
    {
        let rest: Vec<OsString> = args.collect();
        return ExitCode::from(nsmatrix::agent::witness::main(&rest));
    }
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(a) => cli::run(a),
        Command::List(a) => cli::list(a),
        Command::Doctor(a) => cli::doctor(a),
        Command::Images(a) => cli::images(a),
        Command::Diff(a) => cli::diff(a),
        Command::Signoff(a) => cli::signoff(a),
        Command::SignoffImage(a) => nsmatrix::cli_signoff_image::signoff_image(a),
        Command::Merge(a) => cli::merge(a),
        Command::Kernels(a) => nsmatrix::cli_vm::kernels(a),
        Command::Shell(a) => nsmatrix::cli_vm::shell(a),
        Command::Vm(a) => nsmatrix::cli_engine::vm(a),
        Command::ApplyPatch { args } => apply_patch_main(&args),
        Command::Agent {
            batch,
            unpack_stdin,
        } => cli::agent(&batch, unpack_stdin.as_deref()),
    };
    ExitCode::from(code)
}

fn apply_patch_main(args: &[OsString]) -> u8 {
    let code = nsmatrix::apply_patch::run_cli(
        args,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    u8::try_from(code).unwrap_or(1)
}
