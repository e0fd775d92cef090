//! Diagnostics for matrix files: every problem with its file, line and column, collected
//! before anything runs.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// A stable kebab-case code (`unknown-key`, `bad-axis-value`, `duplicate-id`, ...).
    pub code: &'static str,
    pub span: Option<Range<usize>>,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(code: &'static str, span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            span,
            message: message.into(),
            help: None,
        }
    }

    pub fn help(&mut self, h: impl Into<String>) -> &mut Self {
        self.help = Some(h.into());
        self
    }
}

/// The matrix file could not be used; nothing was run.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("failed to read matrix file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(.path, .text, .diagnostics))]
    Invalid {
        path: PathBuf,
        text: String,
        diagnostics: Vec<Diagnostic>,
    },
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map(|i| before[i + 1..].chars().count())
        .unwrap_or(before.chars().count())
        + 1;
    (line, col)
}

/// `file:line:col: error[code]: message`, the offending line, and the help.
pub fn render(path: &Path, text: &str, diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for (i, d) in diags.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match &d.span {
            Some(sp) => {
                let (line, col) = line_col(text, sp.start);
                out.push_str(&format!(
                    "{}:{line}:{col}: error[{}]: {}",
                    path.display(),
                    d.code,
                    d.message
                ));
                if let Some(src) = text.lines().nth(line - 1) {
                    out.push_str(&format!(
                        "\n  {line:>4} | {src}\n       | {}^",
                        " ".repeat(col.saturating_sub(1))
                    ));
                }
            }
            None => out.push_str(&format!(
                "{}: error[{}]: {}",
                path.display(),
                d.code,
                d.message
            )),
        }
        if let Some(h) = &d.help {
            out.push_str(&format!("\n  help: {h}"));
        }
    }
    if diags.len() > 1 {
        out.push_str(&format!(
            "\n{} problems in {}; nothing was run",
            diags.len(),
            path.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let t = "a = 1\nbé = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, t.find('=').unwrap()), (1, 3));
        let second_eq = t.rfind('=').unwrap();
        assert_eq!(line_col(t, second_eq), (2, 4));
    }

    #[test]
    fn render_names_file_line_col_and_help() {
        let t = "x = 1\n[bogus]\n";
        let mut d = Diagnostic::new("unknown-key", Some(7..12), "unknown key `bogus`");
        d.help("remove it");
        let r = render(Path::new("m.toml"), t, &[d]);
        assert!(
            r.starts_with("m.toml:2:2: error[unknown-key]: unknown key `bogus`"),
            "{r}"
        );
        assert!(r.contains("help: remove it"));
    }
}
