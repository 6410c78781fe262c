//! Guest images, built from public sources and kept in a local store:
//! - the kernel: Debian's `linux-source-6.1` with `kernel/slicer.config` merged onto
//!   `tinyconfig` (no modules, no PCI, virtio-mmio);
//! - the root filesystem: `debootstrap --variant=minbase` plus the static `slicer-agent`,
//!   written as ext4 with `mkfs.ext4 -d` (no mount needed), in two variants: `min` (the agent is
//!   PID 1) and `systemd` (the agent is a systemd unit).
//!
//! Every artifact lives under a directory named by the hash of its inputs, so a rebuild with
//! unchanged inputs only checks hashes.

mod build;
pub mod disk;
mod error;
pub mod oci;
mod progress;
mod store;
pub mod tools;

pub use build::{build_image, BuildOptions};
pub use error::{Error, Result};
pub use store::{is_builtin, key_of, Image, ImageStore};

use std::fmt;
use std::str::FromStr;

/// The kernel config fragment kept in the repository.
pub const KERNEL_FRAGMENT: &str = include_str!("../kernel/slicer.config");

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// slicer-agent is PID 1: fastest boot.
    Min,
    /// systemd is PID 1 and runs slicer-agent as a unit.
    Systemd,
}

impl Variant {
    pub fn as_str(&self) -> &'static str {
        match self {
            Variant::Min => "min",
            Variant::Systemd => "systemd",
        }
    }

    /// The `init=` kernel argument the variant boots with, if any.
    pub fn init(&self) -> Option<&'static str> {
        match self {
            Variant::Min => Some(AGENT_GUEST_PATH),
            Variant::Systemd => None,
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "min" => Ok(Variant::Min),
            "systemd" => Ok(Variant::Systemd),
            other => Err(format!("unknown image variant {other:?}: expected min or systemd")),
        }
    }
}

/// Where the agent lives inside the guest.
pub const AGENT_GUEST_PATH: &str = "/usr/local/bin/slicer-agent";
