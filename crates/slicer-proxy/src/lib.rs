//! Slicer Proxy: the egress data plane `slicer proxy up` runs, and what the daemon shares with
//! it: rule validation and matching (`rules`), the control channel's messages and paths
//! (`control`), a host group's CA (`ca`).
pub mod ca;
pub mod control;
pub mod error;
pub mod rules;

pub use error::{Error, Result};
