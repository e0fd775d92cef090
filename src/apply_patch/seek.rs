//! [`seek`]: find a run of lines in a file the way Codex does, from exact to fuzzy.

/// Where `pattern` starts in `lines`, at or after `start`; with `eof`, only where it would
/// end the file. Each pass is tried over all positions before the next, looser pass:
/// exact, trailing whitespace ignored, surrounding whitespace ignored, then also typographic
/// punctuation folded to ASCII.
pub(crate) fn seek(lines: &[String], pattern: &[String], start: usize, eof: bool) -> Option<usize> {
    if pattern.is_empty() {
        return Some(start);
    }
    if pattern.len() > lines.len() {
        return None;
    }
    let last = lines.len() - pattern.len();
    let from = if eof { last } else { start };
    if from > last {
        return None;
    }
    let passes: [fn(&str, &str) -> bool; 4] = [
        |a, b| a == b,
        |a, b| a.trim_end() == b.trim_end(),
        |a, b| a.trim() == b.trim(),
        |a, b| fold(a).eq(fold(b)),
    ];
    passes.iter().find_map(|same| {
        (from..=last).find(|&i| {
            lines[i..i + pattern.len()]
                .iter()
                .zip(pattern)
                .all(|(l, p)| same(l, p))
        })
    })
}

/// Trimmed, with dashes, quotes and odd spaces folded to their ASCII forms, so a patch
/// written in ASCII still finds a line holding typographic punctuation.
fn fold(s: &str) -> impl Iterator<Item = char> + '_ {
    s.trim().chars().map(|c| match c {
        '\u{2010}'..='\u{2015}' | '\u{2212}' => '-',
        '\u{2018}'..='\u{201B}' => '\'',
        '\u{201C}'..='\u{201F}' => '"',
        '\u{00A0}' | '\u{2002}'..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}' => ' ',
        c => c,
    })
}

#[cfg(test)]
mod tests {
    use super::seek;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn passes_in_order() {
        let lines = v(&["a  ", "  b", "“q” — x"]);
        assert_eq!(seek(&lines, &v(&["a"]), 0, false), Some(0));
        assert_eq!(seek(&lines, &v(&["b"]), 0, false), Some(1));
        assert_eq!(seek(&lines, &v(&["\"q\" - x"]), 0, false), Some(2));
        assert_eq!(seek(&lines, &v(&["a"]), 1, false), None);
        assert_eq!(seek(&lines, &v(&["a", "b", "c", "d"]), 0, false), None);
        assert_eq!(seek(&lines, &v(&["b"]), 0, true), None);
        assert_eq!(seek(&lines, &v(&["“q” — x"]), 0, true), Some(2));
    }
}
