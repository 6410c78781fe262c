//! What a VM's QEMU may see and do, in the spirit of Firecracker's jailer.
//!
//! - [`cgroup`]: one cgroup per VM under one the daemon owns (`slicer`), with memory (no swap),
//!   CPU quota, pids and IO weight; cgroup v2 and v1 through one type.
//! - [`uid`]: one unprivileged uid per running VM, from a range, never shared by two running VMs
//!   on the host (also across daemons).
//! - [`jail`]: what the child does between `fork` and `exec`: join its cgroup, a mount namespace
//!   whose root is an empty read-only tmpfs holding only the VM's directory, its kernel and
//!   disk images, the host's `/usr` (read-only, for QEMU and its libraries) and a few device
//!   nodes; drop every capability, switch to the VM's uid, `no_new_privs`, rlimits.
//!
//! Written on raw syscalls: the child side must be async-signal-safe (no allocation after
//! `fork`), which the maintained namespace crates do not promise for their helpers.

pub mod cgroup;
pub mod inspect;
pub mod jail;
pub mod uid;

pub use cgroup::{Cgroup, Hierarchy, Limits};
pub use inspect::{inspect, Confinement};
pub use jail::{JailSpec, Prepared};
pub use uid::{UidLease, UidPool};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy with the memory, cpu and pids controllers is mounted (looked at /proc/self/mounts)")]
    NoCgroups,
    #[error("no free uid left in {start}..{end} (every one runs a VM)")]
    NoFreeUid { start: u32, end: u32 },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
