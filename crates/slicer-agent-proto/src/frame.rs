//! Framing of exec streams: `[kind: u8][len: u32 BE][payload]`.
//!
//! The host decodes frames written by a guest it does not trust, so the decoder bounds every
//! length and rejects unknown kinds instead of guessing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest payload a frame may carry. Output is chunked well below this.
pub const MAX_FRAME_PAYLOAD: usize = 1024 * 1024;
/// Largest exec spec (the JSON prefix of an exec request body).
pub const MAX_SPEC_LEN: usize = 1024 * 1024;
const HEADER_LEN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Started = 1,
    Stdout = 2,
    Stderr = 3,
    Exit = 4,
    Error = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Started,
            2 => Kind::Stdout,
            3 => Kind::Stderr,
            4 => Kind::Exit,
            5 => Kind::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_PAYLOAD}")]
    TooLarge(usize),
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

/// Encodes one frame.
pub fn encode(kind: Kind, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + payload.len());
    b.put_u8(kind as u8);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// Encodes a frame whose payload is JSON.
pub fn encode_json<T: serde::Serialize>(kind: Kind, value: &T) -> Bytes {
    // Serializing our own plain structs cannot fail.
    let json = serde_json::to_vec(value).unwrap_or_default();
    encode(kind, &json)
}

/// Incremental decoder: feed chunks as they arrive, take frames out.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = Kind::from_u8(self.buf[0]).ok_or(FrameError::UnknownKind(self.buf[0]))?;
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// Call at end of stream: errors if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }
}

/// Prefix of an exec request body: the spec's length and JSON.
pub fn encode_spec<T: serde::Serialize>(spec: &T) -> Bytes {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let mut b = BytesMut::with_capacity(4 + json.len());
    b.put_u32(json.len() as u32);
    b.put_slice(&json);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_in_odd_chunks() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(Kind::Stdout, b"hello"));
        wire.extend_from_slice(&encode(Kind::Stderr, b""));
        wire.extend_from_slice(&encode(Kind::Exit, b"{}"));
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for chunk in wire.chunks(3) {
            d.push(chunk);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].payload.as_ref(), b"hello");
        assert_eq!(got[1].kind, Kind::Stderr);
        assert_eq!(got[2].kind, Kind::Exit);
    }

    #[test]
    fn hostile_frames_are_rejected() {
        let mut d = Decoder::default();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind(9)));
        let mut d = Decoder::default();
        d.push(&[2, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
        let mut d = Decoder::default();
        d.push(&[2, 0, 0, 0, 9, 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated(6)));
    }
}
