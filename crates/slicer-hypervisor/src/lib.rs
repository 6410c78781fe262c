//! Hypervisor backends. Today: QEMU's `microvm` machine, with KVM where KVM can really boot
//! our guest and TCG elsewhere.

pub mod accel;
pub mod console;
mod error;
pub mod qemu;
pub mod qmp;

pub use accel::{Accel, AccelChoice};
pub use error::{Error, Result};
pub use qemu::{Exit, Jail, QemuConfig, QemuNet, QemuProcess};
pub use qmp::Qmp;
