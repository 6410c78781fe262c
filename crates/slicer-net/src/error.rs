//! Errors of VM networking: running `ip` and `nft`, writing the kernel's network settings
//! under `/proc/sys`, and checking a bridge's gateway, interface names and MACs. File operations keep their
//! `std::io::Error` as the source, so a caller can walk `std::error::Error::source()` to it.

use std::fmt;

/// Everything that can fail in `slicer-net`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed; `context` says which (e.g. "enabling IPv4 forwarding").
    #[error(fmt = fmt_io)]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// `ip` or `nft` could not be started (most often: not installed; `package` has it).
    #[error(fmt = fmt_spawn)]
    Spawn {
        program: String,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `ip` or `nft` ran and failed; `stderr` is its trimmed error output.
    #[error("{program} {args} failed: {stderr}")]
    Command {
        program: String,
        /// The arguments, space-separated.
        args: String,
        stderr: String,
    },
    /// A bridge's gateway is not an IPv4 address with a prefix (e.g. 192.168.137.1/24).
    #[error("gateway {gateway:?} is not an IPv4 address with a prefix")]
    InvalidGateway { gateway: String },
    /// A bridge or TAP name that is no interface name (1-15 of `A-Z a-z 0-9 . _ -`).
    #[error("{name:?} is not an interface name (1-15 letters, digits, '.', '_' or '-')")]
    InvalidName { name: String },
    /// A VM's MAC address is not six hex pairs separated by colons.
    #[error("{mac:?} is not a MAC address")]
    InvalidMac { mac: String },
}

impl Error {
    /// An [`Error::Io`] with its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the program is missing from the host.
    pub fn is_not_installed(&self) -> bool {
        matches!(self, Error::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Shows `context`, and with `{:#}` the io error after it (see [`slicer_error::write_chain`]).
fn fmt_io(context: &str, source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

fn fmt_spawn(program: &str, package: &str, source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    fmt_io(&format!("running {program}"), source, f)?;
    write!(f, " (apt-get install -y {package})")
}

/// `Result` of this crate.
pub type Result<T> = std::result::Result<T, Error>;
