//! Errors of the hypervisor backend: starting, adopting and jailing QEMU, talking QMP to it
//! (commands, saving and loading VM state), and choosing the accelerator (the KVM probe).
//! File and descriptor operations keep their `std::io::Error` as the source, so a caller can
//! walk `std::error::Error::source()` down to it (for example with `slicer_error::is_no_space`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can fail in `slicer-hypervisor`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or descriptor operation failed; `context` says which (e.g. "creating a pipe").
    #[error(fmt = fmt_io)]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The QEMU binary is not installed.
    #[error("{} not found: apt-get install -y qemu-system-x86", binary.display())]
    QemuNotFound { binary: PathBuf },
    /// QEMU (or the KVM probe's QEMU) could not be started.
    #[error(fmt = fmt_spawn)]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU was started but exited before it had a pid.
    #[error("QEMU exited before it got a pid")]
    ExitedAtStart,
    /// `qemu --version` ran and failed.
    #[error("{} --version failed", binary.display())]
    Version { binary: PathBuf },
    /// The VM's jail could not be prepared.
    #[error(fmt = fmt_jail)]
    Jail {
        #[source]
        source: slicer_jail::Error,
    },
    /// A restored QEMU could not be moved into its cgroup (it was killed).
    #[error(fmt = fmt_cgroup)]
    CgroupJoin {
        #[source]
        source: std::io::Error,
    },
    /// A TAP name that the kernel would not take.
    #[error("invalid TAP name {name:?}")]
    InvalidTapName { name: String },
    /// Adopting a process that is not (or no longer) the recorded VM process.
    #[error("process {pid} is not the VM process that was recorded")]
    NotTheRecordedProcess { pid: u32 },
    /// The QMP connection was closed by QEMU.
    #[error("QMP connection closed")]
    QmpClosed,
    /// QEMU spoke something other than QMP (a wrong greeting, a line too long, ...).
    #[error("{message}")]
    QmpProtocol { message: String },
    /// A QMP command answered with an error; `desc` is QEMU's description.
    #[error("QMP {command} failed: {desc}")]
    QmpCommand { command: String, desc: String },
    /// JSON could not be encoded or parsed (QMP, the probe cache).
    #[error(fmt = fmt_json)]
    Json {
        context: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Saving the VM state failed; `reason` is QEMU's.
    #[error("saving the VM state failed: {reason}")]
    SaveFailed { reason: String },
    /// Saving the VM state did not finish in time (the migration was cancelled).
    #[error("saving the VM state took longer than {timeout:?}")]
    SaveTimeout { timeout: Duration },
    /// Loading a saved state failed; `status` is QEMU's run state, `reason` its error.
    #[error("loading the VM state failed (status {status}): {reason}")]
    LoadFailed { status: String, reason: String },
    /// Loading a saved state did not finish in time.
    #[error("loading the VM state took longer than {timeout:?}")]
    LoadTimeout { timeout: Duration },
    /// Acceleration `kvm` was asked for and KVM is not usable on this host.
    #[error(
        "hypervisor acceleration kvm was requested but KVM is not usable here: {reason}; use acceleration auto or tcg"
    )]
    KvmUnusable { reason: String },
    /// The KVM probe boot could not be run.
    #[error("KVM probe: {reason}")]
    Probe { reason: String },
    /// A step failed; `context` says which one, the source is the failure itself (see
    /// [`Error::root`] to match on it).
    #[error(fmt = fmt_context)]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// An [`Error::Io`] with its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// This error with `context` (what was being done) in front.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The error under any [`Error::Context`] layers: the one to match on.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            e => e,
        }
    }
}

fn fmt_io(context: &str, source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

fn fmt_spawn(binary: &std::path::Path, source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("starting {}", binary.display()), source)
}

fn fmt_jail(source: &slicer_jail::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("preparing the VM's jail"), source)
}

fn fmt_cgroup(source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("moving QEMU into its cgroup"), source)
}

fn fmt_json(context: &str, source: &serde_json::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

fn fmt_context(context: &str, source: &Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

/// `Result` of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_root_and_the_chain() {
        let full = Error::io("writing the state", std::io::Error::from_raw_os_error(libc::ENOSPC));
        let e = full.context("suspending");
        assert!(matches!(e.root(), Error::Io { .. }));
        assert!(slicer_error::is_no_space(&e));
        assert_eq!(e.to_string(), "suspending");
        let text = format!("{e:#}");
        assert!(text.starts_with("suspending: writing the state: "), "{text}");
        assert!(text.contains("No space left on device"), "{text}");
        // anyhow shows each cause once.
        let any = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(any.matches("No space left").count(), 1, "{any}");
    }
}
