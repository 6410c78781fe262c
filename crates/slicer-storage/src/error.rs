//! Errors of per-VM disk handling: reading image headers, and creating qcow2 overlays with
//! `qemu-img`. File operations keep their `std::io::Error` as the source, so a caller can walk
//! `std::error::Error::source()` down to it (for example with `slicer_error::is_no_space`).

use std::path::PathBuf;

/// Everything that can fail in `slicer-storage`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed; `context` says which (e.g. "reading /x/disk.qcow2").
    #[error(fmt = fmt_io)]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a qcow2 image where one was required.
    #[error("{} is not a qcow2 file", path.display())]
    NotQcow2 { path: PathBuf },
    /// The base image of an overlay does not exist.
    #[error("base image {} does not exist", path.display())]
    MissingBase { path: PathBuf },
    /// `qemu-img` is not installed.
    #[error("qemu-img not found: apt-get install -y qemu-utils")]
    QemuImgNotFound,
    /// `qemu-img` could not be started.
    #[error(fmt = fmt_spawn)]
    QemuImgSpawn {
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img create` ran and failed; `stderr` is its trimmed error output.
    #[error("qemu-img failed on {}: {stderr}", overlay.display())]
    QemuImg { overlay: PathBuf, stderr: String },
    /// A disk's backing chain cannot be trusted: its record is malformed, or (for a disk made
    /// before chains were recorded) its header names something other than a public image.
    #[error("the backing chain of {} is not trusted: {reason}", disk.display())]
    UntrustedBacking { disk: PathBuf, reason: String },
}

impl Error {
    /// An [`Error::Io`] with its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the failure was a full disk (ENOSPC): an io error with that code anywhere in
    /// the source chain, or `qemu-img` reporting it.
    pub fn is_no_space(&self) -> bool {
        if let Error::QemuImg { stderr, .. } = self {
            return stderr.contains("No space left on device");
        }
        slicer_error::is_no_space(self)
    }
}

/// Shows `context`, and with `{:#}` the io error after it (see [`slicer_error::write_chain`]).
fn fmt_io(context: &str, source: &std::io::Error, f: &mut std::fmt::Formatter) -> std::fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

fn fmt_spawn(source: &std::io::Error, f: &mut std::fmt::Formatter) -> std::fmt::Result {
    fmt_io("running qemu-img", source, f)
}

/// `Result` of this crate.
pub type Result<T> = std::result::Result<T, Error>;
