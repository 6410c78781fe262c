//! The agent protocol: one byte stream (a virtio-serial port today, a vsock stream later) carries
//! HTTP/2, which multiplexes concurrent operations and gives per-stream flow control.
//!
//! Because the host side can disconnect and reconnect at any time (daemon restart, snapshot
//! restore) and stale bytes of an earlier session may still sit in either direction, every
//! session starts with a resync handshake ([`sync`]): the host sends `SYNC magic + nonce`, the
//! agent scans for it, answers `ACK magic + nonce`, and only then do both sides speak HTTP/2.
//!
//! Routes served by the agent (all under `/v1`):
//! - `GET  /v1/health` → [`Health`] JSON
//! - `POST /v1/exec` body = `u32 BE length + ExecRequest JSON` followed by stdin bytes;
//!   response = a stream of [`frame`]s (started, stdout, stderr, exit)
//! - `PUT  /v1/file?path&mode&uid&gid` body = file bytes → [`FileWritten`]
//! - `GET  /v1/file?path` → file bytes, header `x-slicer-mode` (octal)
//! - `PUT  /v1/tar?path&uid&gid` body = tar stream, unpacked into directory `path`
//! - `GET  /v1/tar?path` → tar stream of directory `path`
//! - `POST /v1/power` body = [`PowerRequest`]
//! - `GET  /v1/fs/readdir?path` → `[FsEntry]`, `GET /v1/fs/stat?path` → [`FsEntry`],
//!   `POST /v1/fs/mkdir` body = [`MkdirRequest`], `DELETE /v1/fs/remove?path&recursive`
//! - `GET  /v1/stats` → [`GuestStats`]
//! - `POST /v1/forward?target=host:port|unix:/path`: request body in, response body out
//! - `POST /v1/shell?uid&gid&shell&cwd&term&cols&rows`: a PTY session in [`shell`] frames
//! - `/v1/bg…`: background execs ([`BgStart`], [`BgInfo`], [`BgFrame`], [`BgKill`], [`BgWait`])
//! - `POST /v1/identity` body = [`Identity`]: hostname, machine-id, address, DNS, RNG seed and
//!   clock of a VM restored from a snapshot → [`Identity`] as applied
//! - `PUT  /v1/ca` body = PEM text of CA certificates (at most [`MAX_CA_BUNDLE`]): each is
//!   added to the guest's trust stores → [`CaInstalled`]; `GET /v1/ca` → [`CaInstalled`]
//!
//! Errors are non-2xx responses with an [`ErrorBody`] JSON body.

pub mod body;
pub mod frame;
pub mod lines;
pub mod shell;
pub mod sync;
pub mod types;

pub use types::*;

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_PORT_NAME: &str = "slicer.agent";

/// HTTP/2 tuning shared by both ends: large windows so bulk transfers are not window-bound.
pub mod h2 {
    pub const INITIAL_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    pub const INITIAL_CONN_WINDOW: u32 = 16 * 1024 * 1024;
    pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
    pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
    pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
}

/// Header on `GET /v1/file` responses carrying the file mode in octal.
pub const HEADER_MODE: &str = "x-slicer-mode";
/// Header on `GET /v1/file` responses carrying the file size in bytes.
pub const HEADER_SIZE: &str = "x-slicer-size";

/// The agent's version, reported by health.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A `uid` that means "the image's default non-root user" (`ubuntu`, else `slicer`, else
/// root), which the agent resolves; the same sentinel as SlicerVM's SDKs (`NonRootUser`).
/// An absent `uid` means root: that is what the host's own calls (userdata, secrets) use.
pub const DEFAULT_USER: u32 = u32::MAX;
