//! The proxy crate's one error type.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists (pass --force to replace it)", .0.display())]
    Exists(PathBuf),
    #[error("certificate: {0}")]
    Cert(String),
    /// A rule, client or secret that does not validate; names the field.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("control channel: {0}")]
    Control(String),
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn os(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Os {
            what: what.into(),
            source,
        }
    }
}
