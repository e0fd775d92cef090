//! Subject preparation: find the bwrap build, probe what it supports, and make the setuid (or
//! non-setuid) copy a cell asks for in the batch's private directory.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use crate::protocol::SetuidMode;
use crate::sandbox::argv::BwrapFeatures;

/// A bwrap ready to run.
#[derive(Debug, Clone)]
pub struct PreparedBwrap {
    pub path: PathBuf,
    /// `bubblewrap 0.8.0`, as the build says.
    pub version: String,
    pub features: BwrapFeatures,
    /// The file is root-owned with the setuid bit (whether the kernel honours it is another
    /// matter: no-new-privileges, a nosuid mount or a user namespace can ignore it).
    pub setuid_bit: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error("no bwrap found on PATH ({0})")]
    Missing(String),
    #[error("bwrap build {0} does not exist")]
    NoSuchBuild(PathBuf),
    #[error("failed to make a {mode} copy of {src} (needs root)")]
    Copy {
        mode: &'static str,
        src: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is on a nosuid mount: a setuid copy there would be ignored")]
    Nosuid(PathBuf),
}

impl SubjectError {
    /// Whether this is the subject's own absence (a cell FAIL with `bwrap-missing`) rather than
    /// the harness failing (ERROR).
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            SubjectError::Missing(_) | SubjectError::NoSuchBuild(_)
        )
    }
}

/// Prepares each (build, setuid mode) once per batch; copies live under `dir`.
pub struct Preparer {
    dir: PathBuf,
    done: HashMap<(String, SetuidMode), PreparedBwrap>,
}

impl Preparer {
    pub fn new(dir: PathBuf) -> Self {
        Preparer {
            dir,
            done: HashMap::new(),
        }
    }

    pub fn bwrap(&mut self, build: &str, mode: SetuidMode) -> Result<PreparedBwrap, SubjectError> {
        let key = (build.to_string(), mode);
        if let Some(p) = self.done.get(&key) {
            return Ok(p.clone());
        }
        let src = resolve_build(build)?;
        let path = match mode {
            SetuidMode::AsIs => src.clone(),
            SetuidMode::Force => self.copy(&src, 0o4755, "setuid")?,
            SetuidMode::Never => self.copy(&src, 0o755, "non-setuid")?,
        };
        let version = run_text(&path, "--version").trim().to_string();
        let features = BwrapFeatures::from_help(&run_text(&path, "--help"));
        let meta = fs::metadata(&path).map_err(|e| SubjectError::Copy {
            mode: "inspected",
            src: path.clone(),
            source: e,
        })?;
        let setuid_bit = meta.mode() & 0o4000 != 0 && meta.uid() == 0;
        let p = PreparedBwrap {
            path,
            version,
            features,
            setuid_bit,
        };
        self.done.insert(key, p.clone());
        Ok(p)
    }

    fn copy(&self, src: &Path, mode: u32, what: &'static str) -> Result<PathBuf, SubjectError> {
        let err = |e| SubjectError::Copy {
            mode: what,
            src: src.to_path_buf(),
            source: e,
        };
        let dir = self.dir.join(what);
        fs::create_dir_all(&dir).map_err(err)?;
        // Only root may create the copy; everyone may run it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(err)?;
        if mode & 0o4000 != 0 && is_nosuid(&dir) {
            return Err(SubjectError::Nosuid(dir));
        }
        let dst = dir.join("bwrap");
        fs::copy(src, &dst).map_err(err)?;
        std::os::unix::fs::chown(&dst, Some(0), Some(0)).map_err(err)?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode)).map_err(err)?;
        Ok(dst)
    }
}

/// `system` → the first `bwrap` on PATH (as Codex picks it); otherwise the given path.
pub fn resolve_build(build: &str) -> Result<PathBuf, SubjectError> {
    if build == "system" {
        let path = std::env::var("PATH").unwrap_or_else(|_| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        return path
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join("bwrap"))
            .find(|p| p.is_file())
            .ok_or(SubjectError::Missing(path));
    }
    let p = PathBuf::from(build);
    if p.is_file() {
        Ok(p)
    } else {
        Err(SubjectError::NoSuchBuild(p))
    }
}

/// Start `cmd`, retrying while the kernel refuses with ETXTBSY ("Text file busy").
///
/// An executable this process copied (a bwrap made setuid, a Codex binary) had a writable file
/// descriptor while it was written. Close-on-exec closes it in children at their exec, but a
/// child another thread forks during the copy holds it until then, and executing the copy in
/// that window fails with ETXTBSY. The copy is complete; only the other child's exec is
/// pending, so a short wait is enough. Any other error, and ETXTBSY after about a second, is
/// returned as it is.
pub fn spawn_copied(cmd: &mut Command) -> std::io::Result<Child> {
    let mut wait = Duration::from_millis(1);
    let mut waited = Duration::ZERO;
    loop {
        match cmd.spawn() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && waited < Duration::from_secs(1) =>
            {
                std::thread::sleep(wait);
                waited += wait;
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// [`spawn_copied`], then its output, as [`Command::output`] collects it.
pub fn output_copied(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn_copied(cmd)?.wait_with_output()
}

fn run_text(bin: &Path, arg: &str) -> String {
    match output_copied(Command::new(bin).arg(arg)) {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        }
        Err(e) => format!("failed to run {} {arg}: {e}", bin.display()),
    }
}

/// Whether `dir` is on a mount with `nosuid`.
pub fn is_nosuid(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_flag & libc::ST_NOSUID != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An executable still open for writing cannot be run (ETXTBSY); once the writer is gone
    /// it can, and `spawn_copied` waits for that instead of failing.
    #[test]
    fn a_busy_copy_is_started_once_its_writer_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("true");
        fs::copy("/bin/true", &exe).unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        let writer = fs::OpenOptions::new().write(true).open(&exe).unwrap();
        let err = Command::new(&exe).spawn().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ExecutableFileBusy, "{err}");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(writer);
        });
        let status = spawn_copied(&mut Command::new(&exe))
            .expect("started after the writer closed")
            .wait()
            .unwrap();
        assert!(status.success());
        closer.join().unwrap();
        // Other errors come back at once.
        let missing = spawn_copied(&mut Command::new(d.path().join("missing"))).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn missing_builds() {
        assert!(matches!(
            resolve_build("/nonexistent/bwrap"),
            Err(SubjectError::NoSuchBuild(_))
        ));
        assert!(
            resolve_build("/nonexistent/bwrap")
                .unwrap_err()
                .is_missing()
        );
    }

    #[test]
    fn setuid_copy_is_root_owned_4755() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP setuid_copy_is_root_owned_4755: needs root");
            return;
        }
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        // Any executable serves to test the copy; bwrap itself may be absent here.
        let src = std::env::current_exe().unwrap();
        let mut p = Preparer::new(d.path().to_path_buf());
        let b = p.bwrap(src.to_str().unwrap(), SetuidMode::Force).unwrap();
        let m = fs::metadata(&b.path).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!(m.uid(), 0);
        assert!(b.setuid_bit);
        let n = p.bwrap(src.to_str().unwrap(), SetuidMode::Never).unwrap();
        assert_eq!(fs::metadata(&n.path).unwrap().mode() & 0o7777, 0o755);
        assert!(!n.setuid_bit);
    }
}
