//! [`apply_hunks`]: carry out parsed hunks on the file system, in order, as Codex does: no
//! dry run first, so a failure leaves the earlier hunks applied.

use std::fs;
use std::path::{Path, PathBuf};

use super::parser::{Chunk, Hunk};
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
                let abs = cwd.join(path);
                write_creating_parents(&abs, contents.as_bytes())?;
                done.added.push(path.clone());
            }
            Hunk::Delete { path } => {
                let abs = cwd.join(path);
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
                let abs = cwd.join(path);
                let new = updated_contents(&abs, chunks)?;
                match move_to {
                    Some(dest) => {
                        let dest_abs = cwd.join(dest);
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

/// The file's new contents. New lines take the ending of the file's first line (LF if it
/// has none), and every line ends terminated: Codex always leaves a final newline.
pub(crate) fn updated_contents(abs: &Path, chunks: &[Chunk]) -> Result<String, ApplyError> {
    let original = read_text(abs)?;
    let lines = split_file(&original);
    let crlf = lines.first().and_then(|l| l.crlf).unwrap_or(false);
    let texts: Vec<String> = lines.iter().map(|l| l.text.clone()).collect();
    let mut repl = replacements(&texts, abs, chunks)?;
    repl.sort_by_key(|r| r.0);

    let mut out: Vec<Line> = Vec::with_capacity(lines.len());
    let mut src = lines.into_iter();
    let mut at = 0usize;
    for (start, old_len, new) in repl {
        // Replacements never overlap in practice; if an end-of-file chunk makes two overlap,
        // Codex's release build wraps this subtraction and copies the rest of the file
        // first, so do the same rather than panic.
        out.extend(src.by_ref().take(start.wrapping_sub(at)));
        src.by_ref().take(old_len).for_each(drop);
        out.extend(new.into_iter().map(|text| Line {
            text,
            crlf: Some(crlf),
        }));
        at = start + old_len;
    }
    out.extend(src);
    let mut s = String::with_capacity(original.len() + 64);
    for l in out {
        s.push_str(&l.text);
        s.push_str(if l.crlf.unwrap_or(crlf) { "\r\n" } else { "\n" });
    }
    Ok(s)
}

type Replacement = (usize, usize, Vec<String>);

fn replacements(
    lines: &[String],
    abs: &Path,
    chunks: &[Chunk],
) -> Result<Vec<Replacement>, ApplyError> {
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
            out.push((lines.len(), 0, chunk.new_lines.clone()));
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
                out.push((i, old.len(), new.to_vec()));
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
