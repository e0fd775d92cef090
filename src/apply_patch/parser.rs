//! [`parse`]: the `*** Begin Patch` text into [`Hunk`]s, with the leniency of Codex 0.171.
//!
//! The rules below were established by running Codex's own `apply_patch` on probes; where
//! they look odd (e.g. an `*** End of File` line before any change is ignored) that is what
//! Codex does, and a scenario or the generative differential test pins it.

use std::path::PathBuf;

pub(crate) const BEGIN: &str = "*** Begin Patch";
pub(crate) const END: &str = "*** End Patch";
const ADD: &str = "*** Add File: ";
const DELETE: &str = "*** Delete File: ";
const UPDATE: &str = "*** Update File: ";
const MOVE: &str = "*** Move to: ";
const EOF_MARK: &str = "*** End of File";

/// A malformed patch. The `Display` form is exactly what Codex prints on stderr.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The patch as a whole is malformed (its first or last line).
    #[error("Invalid patch: {0}")]
    Patch(String),
    /// One hunk is malformed; `line` is 1-based in the patch (heredoc lines not counted).
    #[error("Invalid patch hunk on line {line}: {message}")]
    Hunk { line: usize, message: String },
}

/// One file operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hunk {
    Add {
        path: PathBuf,
        contents: String,
    },
    Delete {
        path: PathBuf,
    },
    Update {
        path: PathBuf,
        move_to: Option<PathBuf>,
        chunks: Vec<Chunk>,
    },
}

/// One `@@` section of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The text after `@@ `: a line to find first; the change comes after it.
    pub context: Option<String>,
    pub old_lines: Vec<String>,
    pub new_lines: Vec<String>,
    /// `*** End of File` closed the chunk: `old_lines` must be the file's last lines.
    pub end_of_file: bool,
}

/// Split like `str::lines` after a `trim()`: on `\n`, one `\r` before it dropped.
fn split_lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// Parse a whole patch. Never panics, whatever the input.
pub fn parse(patch: &str) -> Result<Vec<Hunk>, ParseError> {
    let lines = split_lines(patch.trim());
    let body = boundaries(&lines)?;
    let mut hunks = Vec::new();
    let mut rest = body;
    let mut line_no = 2;
    while !rest.is_empty() {
        if rest[0].trim() == END {
            // An inner `*** End Patch` ends the hunks; only more end markers may follow it
            // (Codex reports anything else as a bad last line).
            if rest[1..].iter().all(|l| l.trim() == END) {
                break;
            }
            return Err(last_line_error());
        }
        let (hunk, used) = parse_hunk(rest, line_no)?;
        hunks.push(hunk);
        line_no += used;
        rest = &rest[used..];
    }
    Ok(hunks)
}

fn last_line_error() -> ParseError {
    ParseError::Patch("The last line of the patch must be '*** End Patch'".into())
}

fn strict_boundaries<'a>(lines: &'a [&'a str]) -> Result<&'a [&'a str], ParseError> {
    let first = lines.first().map(|l| l.trim());
    let last = lines.last().map(|l| l.trim());
    match (first, last) {
        (Some(f), Some(l)) if f == BEGIN && l == END && lines.len() >= 2 => {
            Ok(&lines[1..lines.len() - 1])
        }
        (Some(f), _) if f != BEGIN => Err(ParseError::Patch(
            "The first line of the patch must be '*** Begin Patch'".into(),
        )),
        _ => Err(last_line_error()),
    }
}

/// The body between the markers; a `<<'EOF'` … `EOF` heredoc wrapper (as a model writes it
/// when it believes a shell runs the command) is peeled off first if the plain check fails.
fn boundaries<'a>(lines: &'a [&'a str]) -> Result<&'a [&'a str], ParseError> {
    let err = match strict_boundaries(lines) {
        Ok(body) => return Ok(body),
        Err(e) => e,
    };
    if lines.len() >= 4 {
        let (first, last) = (lines[0], lines[lines.len() - 1]);
        if matches!(first, "<<EOF" | "<<'EOF'" | "<<\"EOF\"") && last.ends_with("EOF") {
            return strict_boundaries(&lines[1..lines.len() - 1]);
        }
    }
    Err(err)
}

fn starts_hunk(line: &str) -> bool {
    line.starts_with(ADD) || line.starts_with(DELETE) || line.starts_with(UPDATE)
}

fn parse_hunk(lines: &[&str], line_no: usize) -> Result<(Hunk, usize), ParseError> {
    let header = lines[0].trim();
    if let Some(path) = header.strip_prefix(ADD) {
        let mut contents = String::new();
        let mut used = 1;
        for l in &lines[1..] {
            let Some(text) = l.strip_prefix('+') else {
                break;
            };
            contents.push_str(text);
            contents.push('\n');
            used += 1;
        }
        return Ok((
            Hunk::Add {
                path: PathBuf::from(path),
                contents,
            },
            used,
        ));
    }
    if let Some(path) = header.strip_prefix(DELETE) {
        return Ok((
            Hunk::Delete {
                path: PathBuf::from(path),
            },
            1,
        ));
    }
    if let Some(path) = header.strip_prefix(UPDATE) {
        let mut used = 1;
        let mut rest = &lines[1..];
        let move_to = rest
            .first()
            .and_then(|l| l.strip_prefix(MOVE))
            .map(|p| PathBuf::from(p.trim_end()));
        if move_to.is_some() {
            used += 1;
            rest = &rest[1..];
        }
        let mut chunks = Vec::new();
        while let Some(&line) = rest.first() {
            // Blank lines separate chunks, but before the first chunk a blank line is an
            // (empty) context line: Codex 0.171 behaves so.
            if !chunks.is_empty() && line.trim().is_empty() {
                used += 1;
                rest = &rest[1..];
                continue;
            }
            if starts_hunk(line) || line.trim() == END {
                break;
            }
            let (chunk, n) = parse_chunk(rest, line_no + used, chunks.is_empty())?;
            chunks.extend(chunk);
            used += n;
            rest = &rest[n..];
        }
        if chunks.is_empty() {
            return Err(ParseError::Hunk {
                line: line_no,
                message: format!("Update file hunk for path '{path}' is empty"),
            });
        }
        return Ok((
            Hunk::Update {
                path: PathBuf::from(path),
                move_to,
                chunks,
            },
            used,
        ));
    }
    Err(ParseError::Hunk {
        line: line_no,
        message: format!(
            "'{header}' is not a valid hunk header. Valid hunk headers: '*** Add File: {{path}}', '*** Delete File: {{path}}', '*** Update File: {{path}}'"
        ),
    })
}

/// One chunk from the start of `lines` (non-empty). Returns `None` for a first chunk that
/// held only `*** End of File` lines: Codex skips those.
fn parse_chunk(
    lines: &[&str],
    line_no: usize,
    first: bool,
) -> Result<(Option<Chunk>, usize), ParseError> {
    let head = lines[0].trim_end();
    let (context, start) = if head == "@@" {
        (None, 1)
    } else if let Some(ctx) = lines[0].strip_prefix("@@ ") {
        (Some(ctx.trim_end().to_string()), 1)
    } else if first {
        (None, 0)
    } else {
        return Err(ParseError::Hunk {
            line: line_no,
            message: format!(
                "Expected update hunk to start with a @@ context marker, got: '{}'",
                lines[0]
            ),
        });
    };
    if start >= lines.len() {
        return Err(no_lines(line_no + 1));
    }
    let mut chunk = Chunk {
        context,
        old_lines: Vec::new(),
        new_lines: Vec::new(),
        end_of_file: false,
    };
    let mut content = 0;
    let mut used = start;
    for &line in &lines[start..] {
        if line.trim_end() == EOF_MARK {
            if content == 0 {
                if start == 0 {
                    used += 1;
                    continue;
                }
                return Err(no_lines(line_no + start));
            }
            chunk.end_of_file = true;
            used += 1;
            break;
        }
        match line.as_bytes().first() {
            None => {
                chunk.old_lines.push(String::new());
                chunk.new_lines.push(String::new());
            }
            Some(b' ') => {
                chunk.old_lines.push(line[1..].to_string());
                chunk.new_lines.push(line[1..].to_string());
            }
            Some(b'+') => chunk.new_lines.push(line[1..].to_string()),
            Some(b'-') => chunk.old_lines.push(line[1..].to_string()),
            Some(_) => {
                if content == 0 {
                    return Err(ParseError::Hunk {
                        line: line_no + used,
                        message: format!(
                            "Unexpected line found in update hunk: '{line}'. Every line should start with ' ' (context line), '+' (added line), or '-' (removed line)"
                        ),
                    });
                }
                break;
            }
        }
        content += 1;
        used += 1;
    }
    if content == 0 {
        return Ok((None, used));
    }
    Ok((Some(chunk), used))
}

fn no_lines(line: usize) -> ParseError {
    ParseError::Hunk {
        line,
        message: "Update hunk does not contain any lines".into(),
    }
}
