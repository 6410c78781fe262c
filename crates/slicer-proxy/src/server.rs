//! PLACEHOLDER (admin branch): the interface of `slicer proxy up`, so the CLI builds before the
//! real listeners land. The proxy engineer's `server.rs` replaces this file whole.

use std::path::PathBuf;

use crate::control::Mode;
use crate::error::{Error, Result};

/// What `slicer proxy up` was given.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// `--hostgroup`.
    pub group: String,
    /// `--bind`: an IP (or IP/prefix) the guests reach the proxy at.
    pub bind: String,
    /// `--deny-cidr` (repeatable).
    pub deny_cidrs: Vec<String>,
    pub mode: Mode,
    /// The daemon's data directory (its control socket and state file live under it).
    pub data_dir: PathBuf,
    /// The working folder `slicer up` runs in (`.slicer/ca/<group>/`).
    pub base_dir: PathBuf,
    /// Test only: host names resolved from this file instead of DNS.
    pub hosts_file: Option<PathBuf>,
    /// Extra CA the proxy trusts for upstreams.
    pub upstream_ca: Option<PathBuf>,
    pub max_connections: usize,
}

/// Runs the proxy until SIGINT/SIGTERM.
pub async fn run(opts: UpOptions) -> Result<()> {
    let _ = opts;
    Err(Error::Control(
        "the proxy server is not built into this binary yet (placeholder)".into(),
    ))
}
