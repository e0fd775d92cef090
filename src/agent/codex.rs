//! The real Codex CLI as a subject: `codex sandbox -c sandbox_mode=workspace-write -- codex
//! --codex-run-as-apply-patch PATCH`, as the cell's uid, judged exactly like a bwrap cell, with
//! the bwrap Codex actually started observed in /proc while it runs.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use super::cell::{CellCtx, lay_out, record, remove_any, run_program};
use super::judge::judge;
use crate::protocol::{CellRecord, Outcome};
use crate::scenario;

/// The Codex packages of a batch, each usable by the cell's uid: used where they are when that
/// uid can reach them (a container's or guest's read-only package), else copied into the
/// batch's directory with the package's layout (the host's cache may sit under a home
/// directory the cell's uid cannot enter).
pub(super) struct Copies {
    dir: PathBuf,
    done: HashMap<PathBuf, (PathBuf, Entry)>,
}

use crate::protocol::CodexEntry as Entry;

impl Copies {
    pub(super) fn new(dir: PathBuf) -> Self {
        Copies {
            dir,
            done: HashMap::new(),
        }
    }

    /// A Codex the environment has installed itself (the image's own), used where it is: its
    /// package stays as installed, so it finds its own bundled bwrap as it does for users.
    fn in_place(&mut self, codex: &Path) -> (PathBuf, Entry) {
        if let Some(p) = self.done.get(codex) {
            return p.clone();
        }
        let help_home = self.dir.join(format!("help-home-{}", self.done.len()));
        let _ = fs::create_dir_all(&help_home);
        let entry = Entry::detect(codex, &help_home);
        let _ = fs::remove_dir_all(&help_home);
        self.done
            .insert(codex.to_path_buf(), (codex.to_path_buf(), entry.clone()));
        (codex.to_path_buf(), entry)
    }

    /// `<pkg>/bin/codex` as the batch's uid can run it: in place when that uid can reach it
    /// and its bundled fallback `<pkg>/codex-resources/bwrap`, else both copied to
    /// `<batch>/codex/N/` with the same layout. Returns the `bin/codex` to run, and how it
    /// enters its sandbox (`known` when the host has read it already).
    fn get(
        &mut self,
        codex_bin: &Path,
        uid: u32,
        gid: u32,
        known: Option<&Entry>,
    ) -> Result<(PathBuf, Entry)> {
        if let Some(p) = self.done.get(codex_bin) {
            return Ok(p.clone());
        }
        if !codex_bin.is_file() {
            anyhow::bail!(
                "the codex binary {} is not in this environment",
                codex_bin.display()
            );
        }
        let bundled = codex_bin
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("codex-resources/bwrap"))
            .filter(|b| b.is_file());
        let root = self.dir.join(self.done.len().to_string());
        let in_place = executable_by(codex_bin, uid, gid)
            && bundled
                .as_deref()
                .is_none_or(|b| executable_by(b, uid, gid));
        let bin = if in_place {
            codex_bin.to_path_buf()
        } else {
            let bin = root.join("bin").join("codex");
            copy_exec(codex_bin, &bin)?;
            if let Some(bundled) = &bundled {
                copy_exec(bundled, &root.join("codex-resources").join("bwrap"))?;
            }
            bin
        };
        let entry = match known {
            Some(e) => e.clone(),
            None => {
                let help_home = root.join("help-home");
                fs::create_dir_all(&help_home)?;
                let entry = Entry::detect(&bin, &help_home);
                let _ = fs::remove_dir_all(&help_home);
                entry
            }
        };
        self.done
            .insert(codex_bin.to_path_buf(), (bin.clone(), entry.clone()));
        Ok((bin, entry))
    }
}

/// Whether `uid`/`gid` may execute `file` and enter every directory above it, by the mode
/// bits (root always may). ACLs and security modules are not consulted: a false yes shows up
/// as the cell's own failure to start Codex, never as a pass.
fn executable_by(file: &Path, uid: u32, gid: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let may = |p: &Path, bits: u32| {
        let Ok(m) = fs::metadata(p) else {
            return false;
        };
        let shift = if m.uid() == uid {
            6
        } else if m.gid() == gid {
            3
        } else {
            0
        };
        (m.mode() >> shift) & bits == bits
    };
    may(file, 0o5)
        && file
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
            .all(|d| may(d, 0o1))
}

/// Copy an executable, creating its directories 0755 so the cell's uid can reach it.
fn copy_exec(from: &Path, to: &Path) -> Result<()> {
    let parent = to.parent().expect("a file path");
    fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    for dir in parent.ancestors().take(3) {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("failed to copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The Codex release the scenarios' expected output (stdout/stderr) was recorded from: its
/// cells compare output exactly; other releases' cells are judged on the tree alone.
pub const OUTPUT_RECORDED_FROM: &str = "0.171.0";

/// Flags of a bwrap command line that tell Codex releases apart.
const TELLING_FLAGS: &[&str] = &[
    "--unshare-user",
    "--unshare-pid",
    "--unshare-net",
    "--proc",
    "--argv0",
    "--as-pid-1",
    "--cap-drop",
];

/// A bwrap process seen in the codex process tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeenBwrap {
    exe: String,
    ruid: u32,
    euid: u32,
    /// Its command line, NUL-separated arguments joined by spaces.
    argv: String,
}

/// The executable `/proc/PID/exe` names now.
fn exe_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|e| e.to_string_lossy().into_owned())
}

/// `/proc/PID/cmdline`: its arguments, NUL-separated.
fn cmdline_of(pid: u32) -> Option<Vec<u8>> {
    let mut f = fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    let mut b = Vec::with_capacity(4096);
    std::io::Read::read_to_end(&mut f, &mut b).ok()?;
    Some(b)
}

/// How often Codex's process tree is walked in /proc: without process events, often enough
/// to catch a bwrap that fails within milliseconds; with them, only as a safety net (each
/// exec in the tree is looked at as it happens).
const WALK_EVERY: Duration = Duration::from_millis(2);
const WALK_EVERY_WITH_EVENTS: Duration = Duration::from_millis(20);
/// At most this many processes in /proc (a container's, a guest's): the tree is found by
/// listing /proc.
const SMALL_PROC: usize = 512;

/// Watches Codex's process tree while a cell runs: every bwrap in it (Codex may try one and
/// fall back to another), and the sandbox witness, released once seen.
///
/// With the kernel's process events (see `proc_events`) each exec in the tree is looked at
/// as it happens and the tree is walked every 20 ms; without them (in a container) it is
/// walked every 2 ms. Under TCG the 2 ms walks took 0.9 s of a 2.1 s Codex cell (one-vCPU
/// debian-6.1 guest), which is why the events are used where they can be.
struct CodexWatch {
    uid: u32,
    gid: u32,
    agent: Option<(u64, u64)>,
    seen: Vec<SeenBwrap>,
    witnessed: Option<super::witness::Seen>,
    events: Option<super::proc_events::ProcEvents>,
    /// Why there are no process events, when there are none.
    no_events: Option<String>,
    /// The processes (thread-group ids) of Codex's tree, from fork events.
    members: std::collections::HashSet<u32>,
    /// Execs in the tree not examined yet.
    pending: Vec<u32>,
    /// A process that exec'd as the witness and is not released yet.
    witness_pid: Option<u32>,
    next_walk: Option<std::time::Instant>,
    walks: u32,
    execs: u32,
    /// The Codex binary the cell runs.
    codex: PathBuf,
    /// Each process's executable at the last walk.
    exes: HashMap<u32, String>,
    /// Whether /proc is small enough to be listed at each walk, and the parents read so far.
    proc_is_small: bool,
    parents: HashMap<u32, u32>,
}

impl CodexWatch {
    fn new(uid: u32, gid: u32, agent_bin: &Path, codex: &Path) -> Self {
        let (events, no_events) = match events_here() {
            Ok(e) => (Some(e), None),
            Err(why) => (None, Some(why)),
        };
        CodexWatch {
            uid,
            gid,
            agent: super::witness::identity(agent_bin),
            seen: Vec::new(),
            witnessed: None,
            events,
            no_events,
            members: Default::default(),
            pending: Vec::new(),
            witness_pid: None,
            next_walk: None,
            walks: 0,
            execs: 0,
            codex: codex.to_path_buf(),
            exes: HashMap::new(),
            proc_is_small: true,
            parents: HashMap::new(),
        }
    }

    /// How the tree was watched, for the cell's details.
    fn describe(&self) -> String {
        match &self.no_events {
            None => format!(
                "process events: {} exec(s) in Codex's tree looked at as they happened, and {} walk(s) of the tree (every {} ms)",
                self.execs,
                self.walks,
                WALK_EVERY_WITH_EVENTS.as_millis()
            ),
            Some(why) => format!(
                "{} walk(s) of Codex's tree in /proc (every {} ms; no process events: {why})",
                self.walks,
                WALK_EVERY.as_millis()
            ),
        }
    }

    /// Look at one process of the tree: a bwrap is recorded (with its uids and command line),
    /// a witness remembered. Its executable is read before and after its command line and
    /// ids, so that a process in the middle of an execve (Codex starting `/usr/bin/bwrap`) is
    /// not taken for a bwrap built into Codex: such a sample is skipped (the next look sees it
    /// settled).
    fn examine(&mut self, pid: u32) -> bool {
        let Some(exe) = exe_of(pid) else {
            return false;
        };
        // Empty while an exec is under way (the new program's arguments are not in place yet)
        // or the process is exiting.
        let Some(cmd) = cmdline_of(pid).filter(|c| !c.is_empty()) else {
            return false;
        };
        let mut args = cmd.split(|&c| c == 0);
        let argv0 = args.next().unwrap_or_default();
        if Path::new(std::ffi::OsStr::from_bytes(argv0))
            .file_name()
            .is_some_and(|n| n == super::witness::NAME)
        {
            if self.witnessed.is_none() {
                self.witness_pid = Some(pid);
            }
            return true;
        }
        // The outer sandbox the agent put around Codex is not a bwrap Codex started.
        if cmd
            .split(|&c| c == 0)
            .any(|a| a == crate::sandbox::restrict::OUTER_MARKER.as_bytes())
        {
            return true;
        }
        let named_bwrap = |p: &[u8]| {
            Path::new(std::ffi::OsStr::from_bytes(p))
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("bwrap"))
        };
        // A bwrap built into Codex runs as the codex executable under argv[0] `bwrap`.
        if !named_bwrap(exe.trim_end_matches(" (deleted)").as_bytes()) && !named_bwrap(argv0) {
            return exe_of(pid).as_deref() == Some(exe.as_str());
        }
        let (mut ruid, mut euid) = (u32::MAX, u32::MAX);
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(line) = status.lines().find(|l| l.starts_with("Uid:"))
        {
            let ids: Vec<u32> = line[4..]
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if ids.len() >= 2 {
                (ruid, euid) = (ids[0], ids[1]);
            }
        }
        if exe_of(pid).as_deref() != Some(exe.as_str()) {
            return false;
        }
        let argv = cmd
            .split(|&c| c == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let s = SeenBwrap {
            exe,
            ruid,
            euid,
            argv,
        };
        if !self.seen.iter().any(|o| o.exe == s.exe && o.argv == s.argv) {
            self.seen.push(s);
        }
        true
    }

    /// Read the process events waiting: forks in Codex's tree make its members, and its
    /// execs are queued to be examined.
    fn take_events(&mut self, root: u32) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        self.members.insert(root);
        let (members, pending, execs) = (&mut self.members, &mut self.pending, &mut self.execs);
        let drained = events.drain(|ev| match ev {
            super::proc_events::Event::Fork {
                parent_tgid,
                child_tgid,
            } => {
                if members.contains(&parent_tgid) {
                    members.insert(child_tgid);
                }
            }
            super::proc_events::Event::Exec { tgid } => {
                if members.contains(&tgid) {
                    pending.push(tgid);
                    *execs += 1;
                }
            }
        });
        if drained.is_err() {
            self.events = None;
            self.no_events =
                Some("the kernel dropped events (its buffer overflowed) during this cell".into());
        }
    }

    /// Walk the whole tree below `root`: its processes are examined, and a waiting witness is
    /// seen (while it waits, the sandbox around it is alive) and released. A process whose
    /// executable is the one it had at the last walk is not read again, unless it is a Codex
    /// executable (which may run itself again under another argv[0]): any other exec in the
    /// tree changes the executable.
    fn walk(&mut self, root: u32) {
        self.walks += 1;
        let tree = self.tree(root);
        let mut exes = HashMap::with_capacity(tree.len());
        for &(pid, _) in &tree {
            let Some(exe) = exe_of(pid) else {
                continue;
            };
            let again = self.exes.get(&pid) != Some(&exe)
                || Path::new(&exe) == self.codex
                || Path::new(&exe)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("codex"));
            // A sample taken mid-exec is not settled: the process is looked at again next time.
            if !again || self.examine(pid) {
                exes.insert(pid, exe);
            }
        }
        self.exes = exes;
        self.release_witness(root, Some(&tree));
    }

    /// The processes below `root` with their parents. Where /proc lists at most
    /// [`SMALL_PROC`] processes (a container, a guest) from one listing of /proc and each new
    /// process's parent, read once; elsewhere through each task's `children` (see
    /// `witness::descendants`). Under TCG the listing costs a fraction of the per-thread reads,
    /// and without process events the tree is walked every 2 ms.
    fn tree(&mut self, root: u32) -> Vec<(u32, u32)> {
        if !self.proc_is_small {
            return super::witness::descendants(root);
        }
        let Ok(dir) = fs::read_dir("/proc") else {
            return super::witness::descendants(root);
        };
        let pids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        if pids.len() > SMALL_PROC {
            self.proc_is_small = false;
            return super::witness::descendants(root);
        }
        let listed: std::collections::HashSet<u32> = pids.iter().copied().collect();
        self.parents.retain(|p, _| listed.contains(p));
        for pid in pids {
            if let std::collections::hash_map::Entry::Vacant(v) = self.parents.entry(pid)
                && let Some(ppid) = super::witness::parent_of(pid)
            {
                v.insert(ppid);
            }
        }
        super::witness::below(root, &self.parents)
    }

    /// Release the witness if it is waiting (its handler in place), after recording what is
    /// seen of it and its ancestry in `tree` (walked now when not given).
    fn release_witness(&mut self, root: u32, tree: Option<&[(u32, u32)]>) {
        let (Some(pid), None, Some(agent)) = (self.witness_pid, &self.witnessed, self.agent) else {
            return;
        };
        let Some(argv0) =
            cmdline_of(pid).map(|c| c.split(|&b| b == 0).next().unwrap_or_default().to_vec())
        else {
            self.witness_pid = None;
            return;
        };
        if !super::witness::is_waiting(pid, &argv0, agent) {
            return;
        }
        let walked;
        let tree = match tree {
            Some(t) => t,
            None => {
                walked = super::witness::descendants(root);
                for &(p, _) in &walked {
                    self.examine(p);
                }
                &walked
            }
        };
        if !tree.iter().any(|&(p, _)| p == pid) {
            return;
        }
        let w = super::witness::seen_in(pid, root, tree);
        super::witness::release(&w);
        self.witnessed = Some(w);
        self.witness_pid = None;
    }
}

impl super::cell::Watch for CodexWatch {
    fn look(&mut self, root: u32) -> Duration {
        let now = std::time::Instant::now();
        self.take_events(root);
        let every = if self.events.is_some() {
            WALK_EVERY_WITH_EVENTS
        } else {
            WALK_EVERY
        };
        let walk_due = self.next_walk.is_none_or(|t| now >= t);
        let witness_due = self.witness_pid.is_some() && self.witnessed.is_none();
        if walk_due || witness_due || !self.pending.is_empty() {
            let (uid, gid) = (self.uid, self.gid);
            super::witness::as_fsuid(uid, gid, || {
                for pid in std::mem::take(&mut self.pending) {
                    self.examine(pid);
                }
                if walk_due {
                    self.walk(root);
                    self.next_walk = Some(now + every);
                } else if witness_due {
                    self.release_witness(root, None);
                }
            });
            // The agent's own file-system uid changes above are process events too: they are
            // read now rather than woken for (an exec of Codex's among them is kept).
            self.take_events(root);
        }
        if !self.pending.is_empty() {
            return Duration::ZERO;
        }
        // A witness that exec'd is about to wait: look again soon to release it.
        let soon = if self.witness_pid.is_some() && self.witnessed.is_none() {
            WALK_EVERY
        } else {
            every
        };
        self.next_walk
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(every)
            .min(soon)
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        self.events.as_ref().map(|e| e.fd())
    }
}

/// The kernel's process events, if this agent can have them: tried once per agent (a
/// container never acknowledges, and the wait for that should not be paid per cell).
fn events_here() -> std::result::Result<super::proc_events::ProcEvents, String> {
    static REFUSED: std::sync::OnceLock<std::sync::Mutex<Option<String>>> =
        std::sync::OnceLock::new();
    let refused = REFUSED.get_or_init(Default::default);
    if let Some(why) = refused.lock().unwrap().clone() {
        return Err(why);
    }
    // Pid 2 is kthreadd only in the initial pid namespace; elsewhere the kernel would not
    // even answer the subscription.
    if !fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
        let why = "not in the initial pid namespace (a container)".to_string();
        *refused.lock().unwrap() = Some(why.clone());
        return Err(why);
    }
    super::proc_events::ProcEvents::open(Duration::from_millis(200)).map_err(|e| {
        let why = e.to_string();
        *refused.lock().unwrap() = Some(why.clone());
        why
    })
}

/// Where npm puts a global `@openai/codex` (its launcher script), besides `codex` on PATH.
const NPM_GLOBAL_CODEX: &[&str] = &[
    "/usr/local/lib/node_modules/@openai/codex/bin/codex.js",
    "/usr/lib/node_modules/@openai/codex/bin/codex.js",
    "/opt/node/lib/node_modules/@openai/codex/bin/codex.js",
];

/// The environment's own Codex: `codex` on the agent's PATH (the image's) or on the standard
/// one, else npm's usual global locations. `Err` says everywhere it looked.
pub(super) fn find_image_codex() -> std::result::Result<PathBuf, String> {
    let mut dirs: Vec<String> = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    for d in crate::agent::init::PATH.split(':') {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_string());
        }
    }
    let candidates: Vec<PathBuf> = dirs
        .iter()
        .map(|d| Path::new(d).join("codex"))
        .chain(NPM_GLOBAL_CODEX.iter().map(PathBuf::from))
        .collect();
    for c in &candidates {
        if let Ok(m) = fs::metadata(c)
            && m.is_file()
            && m.mode() & 0o111 != 0
        {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "the image has no Codex CLI: no executable `codex` in {} nor npm's global {}",
        dirs.join(":"),
        NPM_GLOBAL_CODEX.join(", ")
    ))
}

/// `codex --version` of an installed Codex (`codex-cli 0.171.0` → `0.171.0`).
pub(super) fn installed_version(codex: &Path) -> String {
    let out = crate::sandbox::subject::output_copied(
        std::process::Command::new(codex)
            .arg("--version")
            .env("PATH", image_path()),
    );
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .last()
            .unwrap_or("unknown")
            .to_string(),
        Ok(o) => format!(
            "unknown (`codex --version` exited {}: {})",
            o.status,
            crate::text::tail(String::from_utf8_lossy(&o.stderr).trim())
        ),
        Err(e) => format!("unknown (`codex --version` did not run: {e})"),
    }
}

/// The PATH an image's own Codex runs with: the image's (the agent's own environment in a
/// container), then the standard one, so its launcher finds `node` where the image has it.
fn image_path() -> String {
    let own = std::env::var("PATH").unwrap_or_default();
    if own.is_empty() {
        crate::agent::init::PATH.to_string()
    } else {
        format!("{own}:{}", crate::agent::init::PATH)
    }
}

/// Which Codex a cell runs: a package nsmatrix carried in (copied into the batch when the
/// cell's uid cannot reach it), with how it enters its sandbox when the host has read that,
/// or the environment's own, where it is installed.
pub(super) enum Source<'a> {
    Pinned(&'a Path, Option<&'a Entry>),
    Image(&'a Path),
}

pub(super) fn prepare_and_run_codex(
    ctx: &CellCtx,
    copies: &mut Copies,
    version: &str,
    source: Source<'_>,
) -> Result<CellRecord> {
    let cell = ctx.cell;
    let sc = scenario::load(&cell.scenario_dir)
        .with_context(|| format!("failed to load scenario {}", cell.scenario_dir.display()))?;
    let (in_image, codex_bin, known) = match source {
        Source::Pinned(p, known) => (false, p, known),
        Source::Image(p) => (true, p, None),
    };
    let got = if in_image {
        Ok(copies.in_place(codex_bin))
    } else {
        copies.get(codex_bin, ctx.spec.uid, ctx.spec.gid, known)
    };
    let (codex, entry) = match got {
        Ok((_, Entry::None(why))) => {
            return Ok(record(
                cell,
                Outcome::Skipped {
                    reason: format!("codex {version}: {why}"),
                },
            ));
        }
        Ok(c) => c,
        Err(e) => {
            return Ok(record(
                cell,
                Outcome::Skipped {
                    reason: format!("codex {version}: {e:#}"),
                },
            ));
        }
    };
    let layout = lay_out(ctx, &sc)?;
    // Codex refuses a CODEX_HOME under /tmp; it lives beside, not inside, the cell's directory
    // so that its files are not taken for an escape from the workspace.
    let home = ctx
        .spec
        .work_dir
        .join("codex-home")
        .join(ctx.dir.file_name().unwrap_or_default());
    fs::create_dir_all(&home)?;
    std::os::unix::fs::chown(&home, Some(ctx.spec.uid), Some(ctx.spec.gid))?;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;
    let patch = fs::read_to_string(sc.patch_path())
        .with_context(|| format!("failed to read {}", sc.patch_path().display()))?;
    // The command in Codex's sandbox starts with the witness (see witness.rs).
    let witness_bin = ctx.apply_patch.with_file_name(super::witness::NAME);
    if fs::symlink_metadata(&witness_bin).is_err() {
        std::os::unix::fs::symlink(&ctx.spec.agent_bin, &witness_bin)
            .with_context(|| format!("failed to link {}", witness_bin.display()))?;
    }
    let mut args: Vec<OsString> = entry.args().iter().map(OsString::from).collect();
    args.extend([
        "-c".into(),
        "sandbox_mode=workspace-write".into(),
        "--".into(),
        witness_bin.clone().into(),
        codex.clone().into(),
        "--codex-run-as-apply-patch".into(),
        patch.into(),
    ]);
    let mut watch = CodexWatch::new(ctx.spec.uid, ctx.spec.gid, &ctx.spec.agent_bin, &codex);
    let path = image_path();
    let mut env: Vec<(&str, &Path)> =
        vec![("CODEX_HOME", home.as_path()), ("HOME", home.as_path())];
    if in_image {
        env.push(("PATH", Path::new(&path)));
    }
    let run = run_program(ctx, &codex, &args, &layout.ws, &env, Some(&mut watch))?;
    let (seen, witnessed) = (std::mem::take(&mut watch.seen), watch.witnessed.take());
    let _ = fs::remove_dir_all(&home);
    let norm = |s: &str| scenario::normalise_output(s, &layout.ws);
    let mut details = BTreeMap::new();
    let nesting = super::observe::probe_nesting_cached(ctx.spec);
    if let Some(n) = &nesting {
        details.insert("nesting.observed".into(), n.describe());
    }
    details.insert("codex.version".into(), version.to_string());
    details.insert("codex.watched".into(), watch.describe());
    drop(watch);
    details.insert("codex.path".into(), codex.display().to_string());
    details.insert(
        "codex.source".into(),
        if in_image {
            "the image's own installation, run where it is installed".into()
        } else {
            "nsmatrix's pinned npm package, carried into the environment".into()
        },
    );
    details.insert(
        "argv".into(),
        format!(
            "{} {} -c sandbox_mode=workspace-write -- {} {} --codex-run-as-apply-patch PATCH",
            codex.display(),
            entry.args().join(" "),
            witness_bin.display(),
            codex.display()
        ),
    );
    let bundled_dir = codex
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("codex-resources"))
        .unwrap_or_default();
    // Every bwrap seen, in order: Codex may try one and fall back to another.
    // Codex before 0.129.0 carries a bwrap built into its own executable, used when there is
    // no system bwrap: the witness then sits in namespaces of its own below the codex
    // executable alone, with no bwrap executable anywhere above it.
    let vendored = witnessed.as_ref().filter(|w| {
        w.bwrap().is_none()
            && w.own_namespaces.contains(&"user")
            && w.own_namespaces.contains(&"mnt")
            && w.ancestors
                .iter()
                .any(|a| Path::new(a.trim_end_matches(" (deleted)")) == codex)
    });
    let used = if seen.is_empty() && vendored.is_some() {
        details.insert("codex.bwrap-setuid-effective".into(), "false".into());
        format!(
            "{} (vendored in codex: the witness's namespaces were made by the codex executable itself)",
            codex.display()
        )
    } else if seen.is_empty() {
        "not observed (no bwrap process was seen in Codex's process tree)".to_string()
    } else {
        let mut suid_bit = false;
        let mut suid_effective = false;
        let parts: Vec<String> = seen
            .iter()
            .map(|b| {
                let path = b.exe.trim_end_matches(" (deleted)");
                let kind = if Path::new(path).starts_with(&bundled_dir)
                    || (in_image && path.contains("/node_modules/@openai/codex"))
                {
                    "bundled"
                } else if Path::new(path) == codex {
                    "vendored in codex"
                } else if path == "/usr/bin/bwrap" {
                    "system"
                } else {
                    "from PATH"
                };
                suid_bit |= fs::metadata(path)
                    .map(|m| m.mode() & 0o4000 != 0 && m.uid() == 0)
                    .unwrap_or(false);
                let effective = b.euid == 0 && b.ruid != 0;
                suid_effective |= effective;
                format!(
                    "{path} ({kind}{})",
                    if effective { ", setuid in effect" } else { "" }
                )
            })
            .collect();
        details.insert("codex.bwrap-setuid-bit".into(), suid_bit.to_string());
        let flags: Vec<String> = seen
            .iter()
            .map(|b| {
                let args: Vec<&str> = b.argv.split(' ').collect();
                let present: Vec<&str> = TELLING_FLAGS
                    .iter()
                    .copied()
                    .filter(|f| args.contains(f))
                    .collect();
                if present.is_empty() {
                    "(none of them)".to_string()
                } else {
                    present.join(" ")
                }
            })
            .collect();
        details.insert("codex.bwrap-flags".into(), flags.join(" then "));
        details.insert(
            "codex.bwrap-argv".into(),
            seen.iter()
                .map(|b| crate::text::tail(&b.argv))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        details.insert(
            "codex.bwrap-setuid-effective".into(),
            suid_effective.to_string(),
        );
        parts.join(" then ")
    };
    details.insert("codex.bwrap".into(), used);
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warn") || l.contains("bubblewrap") || l.contains("user namespace")
        })
        .collect();
    if !warnings.is_empty() {
        details.insert("codex.warnings".into(), warnings.join("\n"));
    }
    details.insert(
        "codex.sandbox-witness".into(),
        witnessed
            .as_ref()
            .map(|w| w.describe())
            .unwrap_or_else(|| "not seen: the command never started in a sandbox".into()),
    );
    let privileged = details
        .get("codex.bwrap-setuid-effective")
        .map(String::as_str)
        == Some("true");
    let ((mut outcome, output_note), facts) = super::observe::judge_with_facts(
        |settle| super::observe::deny_facts(ctx.spec, privileged, settle),
        |facts| {
            let outcome = judge(&sc, &layout, &run, &norm, false, facts);
            // The scenarios' expected output was recorded from one Codex release; another
            // release may word its messages differently. Its cells are judged on the tree, the
            // exit code and the sandbox alone, and the cell says so (and what the full
            // comparison would have said).
            if version == OUTPUT_RECORDED_FROM {
                return (outcome, None);
            }
            let mut tree_only = sc.clone();
            tree_only.meta.stdout = None;
            tree_only.meta.stderr = None;
            if let Some(c) = tree_only.meta.confinement.as_mut() {
                c.sandboxed_stdout = None;
                c.sandboxed_stderr = None;
            }
            let on_tree = judge(&tree_only, &layout, &run, &norm, false, facts);
            let note = match &outcome {
                Outcome::Failed { signature, message }
                    if signature == "output-mismatch" && on_tree != outcome =>
                {
                    format!(
                        "on the tree alone; the output differs from {OUTPUT_RECORDED_FROM}'s: {message}"
                    )
                }
                _ => format!(
                    "on the tree alone (the expected output was recorded from {OUTPUT_RECORDED_FROM}); the output matches it too"
                ),
            };
            (on_tree, Some(note))
        },
        |(o, _)| matches!(o, Outcome::Failed { .. }),
    );
    if let Some(note) = output_note {
        details.insert("codex.output-judged".into(), note);
    }
    if matches!(outcome, Outcome::Failed { .. }) {
        details.insert("signature.facts".into(), facts.describe());
    }
    if outcome == Outcome::Passed {
        let sandboxed = witnessed
            .as_ref()
            .filter(|w| w.bwrap().is_some() && !w.own_namespaces.is_empty())
            .or(vendored);
        if let Some(w) = sandboxed {
            let mut ev = super::observe::Evidence::default();
            super::judge::passed_evidence(&sc, &mut ev);
            ev.set("sandbox", w.describe());
            if let Some(n) = &nesting {
                ev.set("nesting", n.describe());
            }
            ev.set(
                "setuid",
                match details.get("codex.bwrap-setuid-effective").map(String::as_str) {
                    Some("true") => "observed: a bwrap in Codex's process tree ran with euid 0 and a non-root ruid (setuid in effect)",
                    _ => "observed: every bwrap in Codex's process tree ran with its caller's uids (setuid not in effect)",
                },
            );
            ev.write_into(&mut details);
        } else {
            // No bwrap around the command, or no namespace of its own: whatever applied the
            // patch, no sandbox was seen doing it, so this is not a pass of a sandboxed run.
            outcome = Outcome::Failed {
                signature: "sandbox-not-observed".into(),
                message: format!(
                    "apply_patch succeeded but no sandbox was seen around it: {}",
                    details["codex.sandbox-witness"]
                ),
            };
        }
    }
    for t in &layout.absolute_targets {
        remove_any(t);
    }
    Ok(CellRecord {
        id: cell.id.clone(),
        outcome,
        exit_code: run.code,
        duration_ms: 0,
        stdout_tail: crate::text::tail(&norm(&run.stdout)),
        stderr_tail: crate::text::tail(&norm(&run.stderr)),
        details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_behind_a_private_directory_is_not_executable_in_place() {
        let d = tempfile::tempdir().unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let open = d.path().join("open/bin");
        let closed = d.path().join("closed/bin");
        for dir in [&open, &closed] {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join("codex"), b"x").unwrap();
            fs::set_permissions(dir.join("codex"), fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(d.path().join("open"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.path().join("closed"), fs::Permissions::from_mode(0o700)).unwrap();
        let (uid, gid) = (54321, 54321);
        // The temporary directory's own ancestors (/tmp) are world-searchable.
        assert!(executable_by(&open.join("codex"), uid, gid));
        assert!(!executable_by(&closed.join("codex"), uid, gid));
        assert!(executable_by(&closed.join("codex"), 0, 0));
        fs::set_permissions(open.join("codex"), fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!executable_by(&open.join("codex"), uid, gid));
        assert!(!executable_by(&d.path().join("missing"), uid, gid));
    }
}
