//! Text the CLI shows that may come from a guest (console output, error messages quoting the
//! guest, agent-reported strings) has its control characters escaped on a terminal, so a guest
//! cannot drive the user's terminal (move the cursor, retitle the window, rewrite or hide what
//! was shown, answer-back sequences).

use std::borrow::Cow;
use std::fmt::Write;
use std::io::IsTerminal;

/// `s` with every control character except `\n` and `\t` escaped: C0 controls and DEL as
/// `\x1b`, C1 controls (U+0080..U+009F, which some terminals obey too) as `\u{9b}`.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if needs_escape(c) {
            let n = u32::from(c);
            let _ = if n < 0x80 {
                write!(out, "\\x{n:02x}")
            } else {
                write!(out, "\\u{{{n:x}}}")
            };
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// For stdout: escaped when stdout is a terminal, as it is otherwise (a pipe or a file gets
/// the raw text).
pub fn stdout_text(s: &str) -> Cow<'_, str> {
    if std::io::stdout().is_terminal() {
        escape_controls(s)
    } else {
        Cow::Borrowed(s)
    }
}

/// For messages on stderr: always escaped.
pub fn stderr_text(s: &str) -> Cow<'_, str> {
    escape_controls(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_but_newline_and_tab_are_escaped() {
        assert!(matches!(escape_controls("plain text\n\tindented"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("\u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{8}ok\n\t\u{7f}"),
            "\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x08ok\n\t\\x7f"
        );
        assert_eq!(escape_controls("\u{9b}31m é ü \u{85}"), "\\u{9b}31m é ü \\u{85}");
        assert_eq!(escape_controls("\0"), "\\x00");
        // The escape of a backslash sequence is not undone: text stays text.
        assert_eq!(escape_controls("\\x1b"), "\\x1b");
    }
}
