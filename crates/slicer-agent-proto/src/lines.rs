//! Splitting a byte stream into `\n`-terminated lines in linear time.
//!
//! A line is handed out by moving a read offset, never by shifting the rest of the buffer to
//! its front (which made a chunk of N newlines cost N²/2 byte moves), and the search for the
//! next newline starts where the last one stopped. The consumed front is dropped only once it
//! is at least half the buffer, so the compaction is amortized over what was read.

/// Bytes read but not yet handed out as lines.
#[derive(Debug, Default)]
pub struct LineBuf {
    buf: Vec<u8>,
    /// Start of the first byte not yet handed out.
    start: usize,
    /// Bytes from `start` up to here hold no newline.
    scanned: usize,
}

impl LineBuf {
    pub fn new() -> LineBuf {
        LineBuf::default()
    }

    /// Appends `chunk`.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line, with its `\n`.
    pub fn next_line(&mut self) -> Option<&[u8]> {
        let pos = self.buf[self.scanned..].iter().position(|b| *b == b'\n');
        match pos {
            Some(p) => {
                let end = self.scanned + p + 1;
                let line = &self.buf[self.start..end];
                self.start = end;
                self.scanned = end;
                Some(line)
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Length of the incomplete line held (bytes after the last newline handed out).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks() {
        let mut l = LineBuf::new();
        l.push(b"ab");
        assert_eq!(l.next_line(), None);
        l.push(b"c\nde\nf");
        assert_eq!(l.next_line(), Some(&b"abc\n"[..]));
        assert_eq!(l.next_line(), Some(&b"de\n"[..]));
        assert_eq!(l.next_line(), None);
        assert_eq!(l.pending(), 1);
        l.push(b"g\n");
        assert_eq!(l.next_line(), Some(&b"fg\n"[..]));
        assert_eq!(l.next_line(), None);
        assert_eq!(l.pending(), 0);
    }

    /// 1 MiB of newlines in one chunk, then a 1 MiB line in 64-byte chunks: both linear (the
    /// old front-draining reader moved 512 GiB of bytes for the first: minutes of CPU).
    #[test]
    fn a_flood_of_newlines_and_a_long_line_cost_linear_time() {
        let t0 = std::time::Instant::now();
        let mut l = LineBuf::new();
        l.push(&vec![b'\n'; 1 << 20]);
        let mut n = 0usize;
        while let Some(line) = l.next_line() {
            assert_eq!(line, b"\n");
            n += 1;
        }
        assert_eq!(n, 1 << 20);
        for _ in 0..(16 << 10) {
            l.push(&[b'x'; 64]);
            assert_eq!(l.next_line(), None);
        }
        l.push(b"\n");
        assert_eq!(l.next_line().map(<[u8]>::len), Some((1 << 20) + 1));
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    /// 1 MiB of newlines in one chunk from a guest, then a 1 MiB line in 64-byte chunks: both
    /// linear. The old reader drained the buffer from its front per line (512 GiB of byte moves
    /// for the first: minutes of a daemon core) and rescanned the whole line per chunk (8 GiB).
    #[test]
    fn lines_from_a_guest_cost_linear_time() {
        let t0 = std::time::Instant::now();
        let mut l = LineBuf::default();
        l.push(&vec![b'\n'; 1 << 20]);
        let mut n = 0usize;
        while let Some(line) = l.next_line() {
            assert_eq!(line, b"\n");
            n += 1;
        }
        assert_eq!((n, l.pending()), (1 << 20, 0));
        for _ in 0..(16 << 10) {
            l.push(&[b'x'; 64]);
            assert_eq!(l.next_line(), None);
        }
        l.push(b"\nab");
        assert_eq!(l.next_line().map(|v| v.len()), Some((1 << 20) + 1));
        assert_eq!(l.next_line(), None);
        assert_eq!(l.pending(), 2);
        l.push(b"c\n");
        assert_eq!(l.next_line(), Some(&b"abc\n"[..]));
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}
