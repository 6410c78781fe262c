//! Slicer Proxy: the egress data plane `slicer proxy up` runs, and what the daemon shares with
//! it: rule validation and matching (`rules`), the control channel's messages and paths
//! (`control`), a host group's CA (`ca`). The data plane: `server` (listeners, proxy
//! authentication, CONNECT, SOCKS5, passthrough), `mitm` (TLS termination, per-request
//! decisions, credential injection), `upstream` (resolving and refusing what the proxy may not
//! reach), `plane` (what they share), `privs` (dropping root), `adapter` (the `--bind` address).
pub mod ca;
pub mod control;
pub mod error;
pub mod mitm;
pub mod plane;
pub mod rules;
pub mod server;
pub mod suggest;
pub mod upstream;

pub use error::{Error, Result};
