//! The shell session's messages: `[type u8][length u32 BE][payload]`, the same framing as
//! SlicerVM's shell WebSocket, so the daemon passes frames through one per message.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

pub const DATA: u8 = 0x01;
/// Payload: columns u32 BE, rows u32 BE.
pub const WINDOW_SIZE: u8 = 0x02;
pub const SHUTDOWN: u8 = 0x03;
pub const HEARTBEAT: u8 = 0x04;
/// From the guest, last: payload = the shell's exit code (i32 BE).
pub const SESSION_CLOSE: u8 = 0x05;
/// Largest payload accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// Query of `POST /v1/shell`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShellQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
}

pub fn frame(kind: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[kind]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

pub fn window_size(cols: u32, rows: u32) -> Bytes {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&cols.to_be_bytes());
    p[4..].copy_from_slice(&rows.to_be_bytes());
    frame(WINDOW_SIZE, &p)
}

/// Columns and rows of a window-size payload (clamped to the kernel's u16).
pub fn parse_window_size(p: &[u8]) -> Option<(u16, u16)> {
    if p.len() != 8 {
        return None;
    }
    let c = u32::from_be_bytes(p[..4].try_into().ok()?);
    let r = u32::from_be_bytes(p[4..].try_into().ok()?);
    Some((c.min(u16::MAX as u32) as u16, r.min(u16::MAX as u32) as u16))
}

/// Takes one complete frame off the front of `buf`; `None` until one is complete or when the
/// announced length is over [`MAX_FRAME`] (the caller then ends the session).
pub fn take_frame(buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_FRAME || buf.len() < 5 + len {
        return None;
    }
    let kind = buf[0];
    buf.advance(5);
    Some((kind, buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut b = BytesMut::new();
        b.extend_from_slice(&frame(DATA, b"ls\n"));
        b.extend_from_slice(&window_size(120, 40));
        b.extend_from_slice(&frame(DATA, b"par")[..6]);
        assert_eq!(take_frame(&mut b), Some((DATA, Bytes::from_static(b"ls\n"))));
        let (k, p) = take_frame(&mut b).unwrap();
        assert_eq!((k, parse_window_size(&p)), (WINDOW_SIZE, Some((120, 40))));
        assert_eq!(take_frame(&mut b), None, "incomplete");
        let mut huge = BytesMut::from(&[DATA, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(take_frame(&mut huge), None);
    }
}
