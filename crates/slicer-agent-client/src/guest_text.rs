//! Text a guest wrote, made safe to put in a log line.
//!
//! What the host logs about a guest often quotes the guest: its agent's error messages, a
//! command's stderr, QEMU's output, an error chain that wraps any of these. A guest that puts a
//! newline there followed by `2026-12-07T00:00:00Z  INFO ...` would start a line of its own in
//! the daemon's log (a forged entry), and an ESC would drive the terminal that shows it.
//! [`GuestText`] displays such text with every control character escaped, so it stays inside
//! the line it was written on.
//!
//! It lives here because this crate is where guest text enters the host (every answer of the
//! agent passes through it) and every crate that logs about guests (`slicer-vmm`,
//! `slicer-daemon`) depends on it; `slicer-api` is the public API's types, which neither
//! `slicer-vmm` nor this crate use.

use std::fmt::{self, Write};

/// Displays `T` (its `{:#}` form when asked with `{:#}`, e.g. an `anyhow` chain) with control
/// characters escaped: `\n`, `\r`, `\t`, `\0` and `\\` as such, any other C0 or C1 control
/// character, DEL, the Unicode line and paragraph separators and the bidirectional overrides as
/// `\u{..}`. Everything else (UTF-8 included) is kept.
pub struct GuestText<T>(pub T);

impl<T: fmt::Display> fmt::Display for GuestText<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alternate = f.alternate();
        let mut w = Escaping { f };
        if alternate {
            write!(w, "{:#}", self.0)
        } else {
            write!(w, "{}", self.0)
        }
    }
}

impl<T: fmt::Display> fmt::Debug for GuestText<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Whether `c` is escaped by [`GuestText`].
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

struct Escaping<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
}

impl Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(needs_escape) {
            self.f.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.f.write_str("\\n")?,
                '\r' => self.f.write_str("\\r")?,
                '\t' => self.f.write_str("\\t")?,
                '\0' => self.f.write_str("\\0")?,
                '\\' => self.f.write_str("\\\\")?,
                c => write!(self.f, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_start_a_line_or_reach_a_terminal() {
        let forged = "exit 1: oops\n2026-12-07T00:00:00Z  INFO forged\r\x1b[2J\0\x07\u{85}\u{2028}\u{202e}é\\n";
        let shown = GuestText(forged).to_string();
        assert_eq!(
            shown,
            "exit 1: oops\\n2026-12-07T00:00:00Z  INFO forged\\r\\u{1b}[2J\\0\\u{7}\\u{85}\\u{2028}\\u{202e}é\\\\n"
        );
        assert!(!shown.chars().any(needs_escape_but_backslash));
    }

    fn needs_escape_but_backslash(c: char) -> bool {
        c != '\\' && needs_escape(c)
    }

    #[test]
    fn plain_text_is_kept_and_an_error_chain_keeps_its_form() {
        assert_eq!(
            GuestText("VM sb-1: ready (ünïcode)").to_string(),
            "VM sb-1: ready (ünïcode)"
        );
        let e = anyhow::anyhow!("line one\nline two").context("installing SSH keys");
        assert_eq!(format!("{}", GuestText(&e)), "installing SSH keys");
        assert_eq!(
            format!("{:#}", GuestText(&e)),
            "installing SSH keys: line one\\nline two"
        );
    }
}
