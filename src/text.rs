//! Text helpers every layer uses: the tail of an output, the tail of a log, an error's chain.

use std::path::Path;

/// Bytes of stdout/stderr kept per cell.
pub(crate) const TAIL_BYTES: usize = 4096;

/// The last [`TAIL_BYTES`] of `s`, cut at a char boundary (`…` marks a cut).
pub(crate) fn tail(s: &str) -> String {
    if s.len() <= TAIL_BYTES {
        return s.to_string();
    }
    let mut i = s.len() - TAIL_BYTES;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    format!("…{}", &s[i..])
}

/// The last `n` lines of `s`.
pub(crate) fn tail_lines(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a file (empty if it cannot be read), for error messages.
pub(crate) fn tail_of_file(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    tail_lines(&text, n)
}

/// An error and its sources on one line (`a: b: c`), a source whose text its parent already
/// holds left out.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_cuts_on_char_boundaries() {
        let s = "é".repeat(TAIL_BYTES);
        let t = tail(&s);
        assert!(t.len() <= TAIL_BYTES + 4);
        assert!(t.starts_with('…'));
        assert_eq!(tail("short"), "short");
    }

    #[test]
    fn tail_lines_keeps_the_last_ones() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_of_file(Path::new("/nonexistent/file"), 3), "");
    }

    #[test]
    fn error_chain_joins_sources_once() {
        let e = anyhow::anyhow!("inner").context("outer");
        let e: &dyn std::error::Error = e.as_ref();
        assert_eq!(error_chain(e), "outer: inner");
    }
}
