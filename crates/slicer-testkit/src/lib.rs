//! What slicer's tests share, so that each exists once: where the image store and data
//! directory are ([`images_dir`], [`data_dir`]), a free port, which QEMU processes run
//! ([`qemu`]), a local `docker-registry` ([`Registry`]), guest shell scripts ([`guest`]), and
//! daemons to test against: `slicer up` as a process ([`DaemonProcess`]) and, with the
//! `daemon` feature, the daemon library in this process ([`TestDaemon`]).
//!
//! A dev-dependency of the crates' tests, and a dependency of `slicer-bench` (which is not
//! published either). It panics where a test would: a fixture that cannot be set up is a
//! failed test.

#[cfg(feature = "daemon")]
mod daemon;
pub mod guest;
mod paths;
mod process;
pub mod qemu;
mod registry;

#[cfg(feature = "daemon")]
pub use daemon::{config_yaml, daemon_log, TestDaemon};
pub use paths::{data_dir, free_port, images_dir};
pub use process::{wait_healthy, ChildGuard, DaemonProcess};
pub use registry::Registry;
