//! [`apply_hunks`]: carry out parsed hunks on the file system, in order, as Codex does: no
//! dry run first, so a failure leaves the earlier hunks applied.

use std::fs;
use std::path::{Path, PathBuf};

use super::parser::{Chunk, Hunk, LineOp};
use super::seek::seek;

/// Why applying stopped. The `Display` form is exactly Codex's stderr line(s).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("No files were modified.")]
    NothingToDo,
    #[error("Failed to create parent directories for {}", .0.display())]
    CreateParent(PathBuf),
    #[error("Failed to write file {}", .0.display())]
    Write(PathBuf),
    #[error("Failed to delete file {}", .0.display())]
    Delete(PathBuf),
    #[error("Failed to remove original {}", .0.display())]
    RemoveOriginal(PathBuf),
    /// Codex pastes the cause into this one message, so it is part of the text here too.
    #[error("Failed to read file to update {}: {reason}", .path.display())]
    Read { path: PathBuf, reason: String },
    #[error("Failed to find context '{context}' in {}", .path.display())]
    Context { path: PathBuf, context: String },
    #[error("Failed to find expected lines in {}:\n{}", .path.display(), .lines.join("\n"))]
    Lines { path: PathBuf, lines: Vec<String> },
}

/// What a successful run touched, as the patch named the paths.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Affected {
    pub added: Vec<PathBuf>,
    pub modified: Vec<PathBuf>,
    pub deleted: Vec<PathBuf>,
}

impl Affected {
    /// Codex's summary: all additions, then modifications, then deletions.
    pub fn summary(&self) -> String {
        let mut s = String::from("Success. Updated the following files:\n");
        for (tag, paths) in [
            ("A", &self.added),
            ("M", &self.modified),
            ("D", &self.deleted),
        ] {
            for p in paths {
                s.push_str(&format!("{tag} {}\n", p.display()));
            }
        }
        s
    }
}

/// Apply `hunks` with relative paths resolved against `cwd`. Paths are not confined: a
/// `../x` or absolute path is written where it points, exactly as Codex does (the sandbox
/// around the process is what confines it).
pub fn apply_hunks(hunks: &[Hunk], cwd: &Path) -> Result<Affected, ApplyError> {
    if hunks.is_empty() {
        return Err(ApplyError::NothingToDo);
    }
    let mut done = Affected::default();
    for hunk in hunks {
        match hunk {
            Hunk::Add { path, contents } => {
                let abs = absolutize(cwd, path);
                write_creating_parents(&abs, contents.as_bytes())?;
                done.added.push(path.clone());
            }
            Hunk::Delete { path } => {
                let abs = absolutize(cwd, path);
                // Codex refuses anything that is not (a link to) a regular file, so a
                // directory or a dangling or directory symlink fails; a link to a file is
                // removed itself, never its target.
                let is_file = fs::metadata(&abs).is_ok_and(|m| m.is_file());
                if !is_file || fs::remove_file(&abs).is_err() {
                    return Err(ApplyError::Delete(abs));
                }
                done.deleted.push(path.clone());
            }
            Hunk::Update {
                path,
                move_to,
                chunks,
            } => {
                let abs = absolutize(cwd, path);
                let new = updated_contents(&abs, chunks)?;
                match move_to {
                    Some(dest) => {
                        let dest_abs = absolutize(cwd, dest);
                        write_creating_parents(&dest_abs, new.as_bytes())?;
                        // Also when dest == path: Codex then deletes the file it just wrote.
                        fs::remove_file(&abs).map_err(|_| ApplyError::RemoveOriginal(abs))?;
                        done.modified.push(dest.clone());
                    }
                    None => {
                        fs::write(&abs, new).map_err(|_| ApplyError::Write(abs))?;
                        done.modified.push(path.clone());
                    }
                }
            }
        }
    }
    Ok(done)
}

/// `cwd.join(path)` with `.` and `..` resolved lexically, as Codex resolves patch paths (its
/// messages name `/cell/outside/x`, not `/cell/ws/../outside/x`; measured with Codex 0.171.0
/// in its own sandbox). The file system is not consulted, so a `..` after a symlink goes up
/// from the link's name, as it does in Codex.
fn absolutize(cwd: &Path, path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in cwd.join(path).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                // `/..` is `/`; a relative cwd keeps leading `..`s.
                if !out.pop() && !out.has_root() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn write_creating_parents(abs: &Path, bytes: &[u8]) -> Result<(), ApplyError> {
    if let Some(parent) = abs.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|_| ApplyError::CreateParent(abs.to_path_buf()))?;
    }
    fs::write(abs, bytes).map_err(|_| ApplyError::Write(abs.to_path_buf()))
}

fn read_text(abs: &Path) -> Result<String, ApplyError> {
    let fail = |reason: String| ApplyError::Read {
        path: abs.to_path_buf(),
        reason,
    };
    match fs::metadata(abs) {
        Ok(m) if !m.is_file() => {
            return Err(fail(format!("path `{}` is not a file", abs.display())));
        }
        Err(e) => return Err(fail(e.to_string())),
        Ok(_) => {}
    }
    let bytes = fs::read(abs).map_err(|e| fail(e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| fail(e.utf8_error().to_string()))
}

/// One line of a file being updated, with the ending it had (none on an unterminated last
/// line), so that untouched lines keep their own `\n` or `\r\n`.
struct Line {
    text: String,
    crlf: Option<bool>,
}

fn split_file(contents: &str) -> Vec<Line> {
    let mut out = Vec::new();
    let mut rest = contents;
    while let Some(i) = rest.find('\n') {
        let raw = &rest[..i];
        let (text, crlf) = match raw.strip_suffix('\r') {
            Some(t) => (t, true),
            None => (raw, false),
        };
        out.push(Line {
            text: text.to_string(),
            crlf: Some(crlf),
        });
        rest = &rest[i + 1..];
    }
    if !rest.is_empty() {
        out.push(Line {
            text: rest.to_string(),
            crlf: None,
        });
    }
    out
}

/// The file's new contents. Context lines stay as the file had them; new lines take the
/// ending of the file's first line (LF if it has none); every line ends terminated, as Codex
/// always leaves a final newline.
pub(crate) fn updated_contents(abs: &Path, chunks: &[Chunk]) -> Result<String, ApplyError> {
    let original = read_text(abs)?;
    let lines = split_file(&original);
    let crlf = lines.first().and_then(|l| l.crlf).unwrap_or(false);
    let texts: Vec<String> = lines.iter().map(|l| l.text.clone()).collect();
    let mut edits = edits(&texts, abs, chunks)?;
    // Codex applies each run of changed lines as a replacement at its position; at one
    // position, the earlier chunk's comes first (a stable sort keeps that order).
    edits.sort_by_key(|e| e.0);

    let mut out: Vec<Line> = Vec::with_capacity(lines.len() + 16);
    let mut src = lines.into_iter();
    let mut at = 0usize;
    for (pos, remove, insert) in edits {
        // Runs never overlap (each search starts after the previous match); if one did,
        // it would apply where the previous one ended.
        out.extend(src.by_ref().take(pos.saturating_sub(at)));
        at = at.max(pos);
        out.extend(insert.into_iter().map(|text| Line {
            text,
            crlf: Some(crlf),
        }));
        at += src.by_ref().take(remove).count();
    }
    out.extend(src);
    let mut s = String::with_capacity(original.len() + 64);
    for l in out {
        s.push_str(&l.text);
        s.push_str(if l.crlf.unwrap_or(crlf) { "\r\n" } else { "\n" });
    }
    Ok(s)
}

/// A run of changed lines: at a file line index, remove that many lines, insert these.
type Edit = (usize, usize, Vec<String>);

/// The runs of one chunk matched at `start`, walking its ops within the (possibly shortened)
/// old and new line counts. Context lines end a run and stay as the file has them, ending
/// included.
fn chunk_edits(chunk: &Chunk, start: usize, old_len: usize, new_len: usize, out: &mut Vec<Edit>) {
    let (mut o, mut n) = (0, 0);
    let mut run: Option<Edit> = None;
    for op in &chunk.ops {
        let (take_old, take_new) = match op {
            LineOp::Context => (o < old_len, n < new_len),
            LineOp::Remove => (o < old_len, false),
            LineOp::Add => (false, n < new_len),
        };
        match (take_old, take_new) {
            (true, true) => out.extend(run.take()),
            (true, false) => run.get_or_insert_with(|| (start + o, 0, Vec::new())).1 += 1,
            (false, true) => run
                .get_or_insert_with(|| (start + o, 0, Vec::new()))
                .2
                .push(chunk.new_lines[n].clone()),
            (false, false) => {}
        }
        o += usize::from(take_old);
        n += usize::from(take_new);
    }
    out.extend(run);
}

fn edits(lines: &[String], abs: &Path, chunks: &[Chunk]) -> Result<Vec<Edit>, ApplyError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for chunk in chunks {
        if let Some(ctx) = &chunk.context {
            match seek(lines, std::slice::from_ref(ctx), at, false) {
                Some(i) => at = i + 1,
                None => {
                    return Err(ApplyError::Context {
                        path: abs.to_path_buf(),
                        context: ctx.clone(),
                    });
                }
            }
        }
        if chunk.old_lines.is_empty() {
            // A pure addition goes at the very end of the file (after any blank lines),
            // whatever context preceded it.
            let end = lines.len();
            out.push((end, 0, chunk.new_lines.clone()));
            continue;
        }
        let mut old: &[String] = &chunk.old_lines;
        let mut new: &[String] = &chunk.new_lines;
        let mut found = seek(lines, old, at, chunk.end_of_file);
        if found.is_none() && old.last().is_some_and(String::is_empty) {
            // A trailing empty line often stands for the file's final newline.
            old = &old[..old.len() - 1];
            if new.last().is_some_and(String::is_empty) {
                new = &new[..new.len() - 1];
            }
            found = seek(lines, old, at, chunk.end_of_file);
        }
        match found {
            Some(i) => {
                chunk_edits(chunk, i, old.len(), new.len(), &mut out);
                at = i + old.len();
            }
            None => {
                return Err(ApplyError::Lines {
                    path: abs.to_path_buf(),
                    lines: chunk.old_lines.clone(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod absolutize_tests {
    use super::absolutize;
    use std::path::Path;

    /// As Codex 0.171.0 names paths in its messages (measured in its own sandbox).
    #[test]
    fn dot_and_dotdot_resolve_lexically() {
        let cwd = Path::new("/cell/ws");
        assert_eq!(
            absolutize(cwd, Path::new("../outside/x")),
            Path::new("/cell/outside/x")
        );
        assert_eq!(
            absolutize(cwd, Path::new("./a/./b")),
            Path::new("/cell/ws/a/b")
        );
        assert_eq!(absolutize(cwd, Path::new("/tmp/x")), Path::new("/tmp/x"));
        assert_eq!(absolutize(cwd, Path::new("../../../..")), Path::new("/"));
        assert_eq!(
            absolutize(cwd, Path::new("link/../f")),
            Path::new("/cell/ws/f")
        );
    }
}
