//! The daemon's log output: one event, one line.
//!
//! Log lines quote guests (see `slicer_agent_client::GuestText`, which the call sites use).
//! As a second guard, [`OneLine`] wraps the writer of `slicer up`'s `tracing_subscriber::fmt`
//! log: the formatter writes each event in one `write_all` ending in `\n`, and any other
//! newline or C0 control character in it (ESC aside: the formatter's own colours use it and it
//! escapes ESC in values itself) is escaped there, so no text in any event, escaped at its call
//! site or not, can start a line of its own.

use std::io::{self, Write};

/// An `io::Write` that escapes control characters but a final newline in each write.
pub struct OneLine<W>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        if !body.iter().any(|&b| escaped(b)) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b if escaped(b) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Whether byte `b` of an event is escaped: C0 controls (bytes that never occur inside a
/// UTF-8 sequence) but ESC.
fn escaped(b: u8) -> bool {
    b < 0x20 && b != 0x1b
}

/// What `tracing_subscriber::fmt().with_writer(..)` takes: [`OneLine`] around stderr.
pub fn stderr() -> OneLine<io::Stderr> {
    OneLine(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_one_line() {
        let mut out = Vec::new();
        OneLine(&mut out)
            .write_all(b"2026-01-01T00:00:00Z  WARN x: exit 1: a\n2026-12-07T00:00:00Z INFO forged\r\0\x1b[1m\n")
            .expect("written");
        assert_eq!(
            out,
            b"2026-01-01T00:00:00Z  WARN x: exit 1: a\\n2026-12-07T00:00:00Z INFO forged\\r\\x00\x1b[1m\n"
        );
        let mut plain = Vec::new();
        OneLine(&mut plain).write_all("é ok\n".as_bytes()).expect("written");
        assert_eq!(plain, "é ok\n".as_bytes());
    }
}
