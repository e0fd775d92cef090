//! [`Launch`]: one QEMU process — its argv, its per-run files, and the watch loop that streams
//! the agent's events from the results port while it checks for a panic, an early exit, the
//! boot and batch deadlines and cancellation. The process is always killed and reaped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::agent::init::{GUEST_AGENT, RESULTS_PORT};
use crate::protocol::{AgentEvent, LineBuf};

/// How the guest is accelerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The CPU model guests get (the KVM probe boots with the same one).
pub(crate) fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Console {
    /// A log file (batches).
    File(PathBuf),
    /// The terminal (interactive shell); Ctrl-C goes to the guest.
    Stdio,
}

/// Everything one boot needs.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mb: u32,
    pub console: Console,
    /// The file the results port writes to (None: no results port).
    pub results: Option<PathBuf>,
    /// `nsmatrix.mode=` on the kernel command line.
    pub mode: &'static str,
    /// Read-only raw disk images attached as virtio disks, with the serial the guest finds
    /// each by (the Codex packages).
    pub disks: Vec<(PathBuf, String)>,
    /// vCPUs (`-smp`); more than one under TCG runs one host thread per vCPU.
    pub vcpus: u32,
}

/// The kernel command line every guest boots with (batch, shell, bare and engine guests): the
/// console on the first serial port, a panic ends the guest, and probing that only costs time
/// under emulation is skipped. None of it changes what a cell runs on (the kernel, its
/// sysctls, bwrap): `tsc=reliable no_timer_check` trust QEMU's clock, `i8042.*` and
/// `8250.nr_uarts=1` skip devices the guest does not have, and `pci=noacpi` routes PCI
/// interrupts without the ACPI interpreter (measured in a debian-6.1 guest under TCG: loading
/// virtio_pci took 146 ms with ACPI's IRQ routing, 10 ms without).
pub(crate) const BOOT_ARGS: &str = "console=ttyS0 panic=-1 oops=panic loglevel=4 mitigations=off \
     tsc=reliable no_timer_check i8042.noaux i8042.nokbd 8250.nr_uarts=1 pci=noacpi";

impl Launch {
    pub(crate) fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        let smp = self.vcpus.max(1).to_string();
        // TCG emulates several vCPUs on one host thread unless told otherwise.
        let accel = if self.accel == Accel::Tcg && self.vcpus > 1 {
            format!("{},thread=multi", self.accel.as_str())
        } else {
            self.accel.as_str().to_string()
        };
        push(&["-machine", "pc", "-accel", &accel, "-smp", &smp]);
        push(&[
            "-cpu",
            if self.accel == Accel::Kvm {
                "host"
            } else {
                "max"
            },
        ]);
        push(&["-m", &self.memory_mb.to_string()]);
        push(&[
            "-kernel",
            &self.kernel.to_string_lossy(),
            "-initrd",
            &self.initrd.to_string_lossy(),
        ]);
        let cmdline = format!(
            "{BOOT_ARGS} rdinit={GUEST_AGENT} nsmatrix.mode={}",
            self.mode
        );
        push(&["-append", &cmdline]);
        match &self.console {
            Console::File(p) => push(&["-chardev", &format!("file,id=con,path={}", p.display())]),
            Console::Stdio => push(&["-chardev", "stdio,id=con,signal=off"]),
        }
        push(&["-serial", "chardev:con"]);
        for (i, (file, serial)) in self.disks.iter().enumerate() {
            // Shared read-only by every guest that needs it; the host's page cache keeps it
            // warm between guests.
            push(&[
                "-drive",
                &format!(
                    "if=none,id=ro{i},format=raw,readonly=on,file={}",
                    file.display()
                ),
                "-device",
                &format!("virtio-blk-pci,drive=ro{i},serial={serial}"),
            ]);
        }
        if let Some(r) = &self.results {
            push(&["-device", "virtio-serial-pci,id=vser"]);
            push(&["-chardev", &format!("file,id=res,path={}", r.display())]);
            push(&[
                "-device",
                &format!("virtserialport,bus=vser.0,chardev=res,name={RESULTS_PORT}"),
            ]);
        }
        a
    }
}

/// How a watched boot ended.
#[derive(Debug)]
pub(crate) enum Ending {
    /// QEMU exited by itself (the guest powered off, or QEMU failed).
    Exited {
        status: String,
        batch_done: bool,
    },
    Panic,
    BootTimeout,
    BatchTimeout,
    Cancelled,
    SpawnFailed(String),
}

/// What the watch loop saw.
#[derive(Debug)]
pub(crate) struct Watched {
    pub ending: Ending,
    /// From spawn to the agent's first line.
    pub boot_time: Option<Duration>,
    /// From spawn to the first finished cell.
    pub first_result: Option<Duration>,
    pub total: Duration,
}

/// How long a guest may take to power off after its last result.
const POWER_OFF_GRACE: Duration = Duration::from_secs(3);

/// Lines that mean the kernel is gone for good (with `panic=-1 -no-reboot` QEMU also exits).
const PANIC_MARKS: &[&str] = &["Kernel panic - not syncing", "end Kernel panic"];

/// Run QEMU until the guest powers off, panics, times out or the run is cancelled; every agent
/// event is passed to `on_event` as it arrives. QEMU is killed and reaped on every path.
pub(crate) async fn watch(
    launch: &Launch,
    boot_timeout: Duration,
    batch_timeout: Duration,
    cancel: &CancellationToken,
    stderr_log: &Path,
    mut on_event: impl FnMut(AgentEvent),
) -> Watched {
    let start = Instant::now();
    let console_path = match &launch.console {
        Console::File(p) => Some(p.clone()),
        Console::Stdio => None,
    };
    let stderr = match std::fs::File::create(stderr_log) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    };
    let spawned = Command::new(&launch.qemu)
        .args(launch.argv())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Watched {
                ending: Ending::SpawnFailed(format!(
                    "failed to start {}: {e}",
                    launch.qemu.display()
                )),
                boot_time: None,
                first_result: None,
                total: start.elapsed(),
            };
        }
    };
    let mut results = Tail::new(launch.results.clone());
    let mut console = Tail::new(console_path);
    let (mut boot_time, mut first_result, mut batch_done) = (None, None, false);
    let mut done_at: Option<Duration> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let ending = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Ending::Cancelled,
            status = child.wait() => {
                // Drain what the guest wrote before it went away.
                for line in results.read_lines().await {
                    handle(&line, start, &mut boot_time, &mut first_result, &mut batch_done, &mut on_event);
                }
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                let panicked = console.read_lines().await.iter().any(|l| PANIC_MARKS.iter().any(|m| l.contains(m)));
                break if panicked && !batch_done { Ending::Panic } else { Ending::Exited { status, batch_done } };
            }
            _ = tick.tick() => {
                for line in results.read_lines().await {
                    handle(&line, start, &mut boot_time, &mut first_result, &mut batch_done, &mut on_event);
                }
                if console.read_lines().await.iter().any(|l| PANIC_MARKS.iter().any(|m| l.contains(m))) {
                    break Ending::Panic;
                }
                let elapsed = start.elapsed();
                // The batch is complete; a guest that does not go away by itself is stopped.
                if batch_done {
                    let since = *done_at.get_or_insert(elapsed);
                    if elapsed > since + POWER_OFF_GRACE {
                        break Ending::Exited { status: "killed after the batch finished".into(), batch_done };
                    }
                }
                if boot_time.is_none() && elapsed > boot_timeout {
                    break Ending::BootTimeout;
                }
                if elapsed > batch_timeout {
                    break Ending::BatchTimeout;
                }
            }
        }
    };
    // Killing an exited child is harmless; a running one must never outlive the batch.
    let _ = child.start_kill();
    let _ = child.wait().await;
    Watched {
        ending,
        boot_time,
        first_result,
        total: start.elapsed(),
    }
}

fn handle(
    line: &str,
    start: Instant,
    boot_time: &mut Option<Duration>,
    first_result: &mut Option<Duration>,
    batch_done: &mut bool,
    on_event: &mut impl FnMut(AgentEvent),
) {
    let ev = match AgentEvent::parse_line(line) {
        None => return,
        Some(Ok(ev)) => ev,
        Some(Err(e)) => AgentEvent::Log {
            message: format!("unparsable agent line ({e}): {line}"),
        },
    };
    boot_time.get_or_insert_with(|| start.elapsed());
    match &ev {
        AgentEvent::CellFinished(_) => {
            first_result.get_or_insert_with(|| start.elapsed());
        }
        AgentEvent::BatchDone { .. } => *batch_done = true,
        _ => {}
    }
    on_event(ev);
}

/// Follows a file that another process appends to, yielding whole lines.
struct Tail {
    path: Option<PathBuf>,
    file: Option<tokio::fs::File>,
    lines: LineBuf,
}

impl Tail {
    fn new(path: Option<PathBuf>) -> Self {
        Tail {
            path,
            file: None,
            lines: LineBuf::default(),
        }
    }

    async fn read_lines(&mut self) -> Vec<String> {
        if self.file.is_none() {
            let Some(p) = &self.path else {
                return Vec::new();
            };
            self.file = tokio::fs::File::open(p).await.ok();
        }
        let Some(f) = &mut self.file else {
            return Vec::new();
        };
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).await.is_err() {
            return Vec::new();
        }
        self.lines.push(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_has_the_essentials() {
        let l = Launch {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            kernel: "/k/vmlinuz".into(),
            initrd: "/r/initrd".into(),
            memory_mb: 512,
            console: Console::File("/l/console.log".into()),
            results: Some("/r/results".into()),
            mode: "batch",
            disks: vec![("/c/codex-0.171.0.ext4".into(), "nsm-codex-0".into())],
            vcpus: 1,
        };
        let a = l.argv().join(" ");
        for want in [
            "-no-reboot",
            "-accel tcg",
            "-kernel /k/vmlinuz",
            "-initrd /r/initrd",
            "panic=-1",
            "rdinit=/nsmatrix/nsmatrix",
            "file,id=con,path=/l/console.log",
            "name=nsmatrix.results",
            "if=none,id=ro0,format=raw,readonly=on,file=/c/codex-0.171.0.ext4",
            "virtio-blk-pci,drive=ro0,serial=nsm-codex-0",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
    }
}
