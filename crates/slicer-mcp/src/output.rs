//! Output kept within a stated size: what a tool call returns of a command's stdout and
//! stderr, and of a background command's logs. Everything past the limit is counted, not kept,
//! so a command that prints gigabytes costs the server no memory.

/// The marker that ends a cut stream; the tool descriptions quote it.
pub const MARKER: &str = "[slicer: output truncated";

/// One stream's first `limit` bytes and how many bytes it had in all.
#[derive(Debug, Default)]
pub struct Capped {
    kept: Vec<u8>,
    total: u64,
    limit: usize,
}

impl Capped {
    pub fn new(limit: usize) -> Capped {
        Capped {
            kept: Vec::new(),
            total: 0,
            limit,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.limit.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..room.min(data.len())]);
    }

    pub fn kept(&self) -> &[u8] {
        &self.kept
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    /// The kept bytes as text (invalid UTF-8 replaced), with the marker when bytes were cut.
    pub fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.kept).into_owned();
        if self.truncated() {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&format!("{MARKER}: {} of {} bytes shown]", self.kept.len(), self.total));
        }
        s
    }
}

/// Splits NDJSON as it arrives into lines no longer than `max_line`; a longer line is an
/// error (the daemon's frames are far smaller), so a broken or hostile peer cannot make the
/// buffer grow.
#[derive(Debug)]
pub struct Lines {
    buf: slicer_api::lines::LineBuf,
    max_line: usize,
}

impl Lines {
    pub fn new(max_line: usize) -> Lines {
        Lines {
            buf: slicer_api::lines::LineBuf::new(),
            max_line,
        }
    }

    /// Adds `chunk`; returns the complete lines it finished (linear in the chunk, see
    /// [`slicer_api::lines::LineBuf`]).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.buf.push(chunk);
        let mut out = Vec::new();
        while let Some(line) = self.buf.next_line() {
            out.push(line.to_vec());
        }
        if self.buf.pending() > self.max_line {
            return Err(format!(
                "a line of the daemon's answer is longer than {} bytes",
                self.max_line
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let mut c = Capped::new(10);
        c.push(b"hello ");
        c.push(b"world, and more");
        assert_eq!(c.total(), 21);
        assert!(c.truncated());
        assert_eq!(c.text(), format!("hello worl\n{MARKER}: 10 of 21 bytes shown]"));
        let mut c = Capped::new(10);
        c.push(b"short\n");
        assert!(!c.truncated());
        assert_eq!(c.text(), "short\n");
    }

    #[test]
    fn a_zero_limit_keeps_nothing_but_says_so() {
        let mut c = Capped::new(0);
        c.push(b"abc");
        assert_eq!(c.text(), format!("{MARKER}: 0 of 3 bytes shown]"));
    }

    #[test]
    fn lines_are_split_across_chunks_and_bounded() {
        let mut l = Lines::new(8);
        assert_eq!(l.push(b"ab").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(l.push(b"c\nde\nf").unwrap(), vec![b"abc\n".to_vec(), b"de\n".to_vec()]);
        assert!(l.push(b"0123456789").is_err());
    }
}
