//! A real daemon (the library `slicer up` runs) on a free port with a temporary data
//! directory; images come from the store built by scripts/setup.sh. All of it is
//! `slicer-testkit`'s, under the names these tests use.

#![allow(dead_code, unused_imports)]

pub use slicer_testkit::qemu::pid_of as qemu_pid_of;
pub use slicer_testkit::{config_yaml, daemon_log, free_port, images_dir, TestDaemon};

/// No QEMU of ours runs for `hostname`.
pub fn no_qemu_for(hostname: &str) -> bool {
    qemu_pid_of(hostname).is_none()
}
