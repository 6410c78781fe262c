//! What a manager operation can fail with, in the domain's terms. The API maps each kind to
//! an HTTP status (`api::error`); nothing here knows about HTTP.

use std::error::Error as StdError;

/// Why a host-side failure happened, as far as a caller can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFault {
    /// The data directory's file system is full (ENOSPC, SQLITE_FULL).
    DiskFull,
    /// The state database is locked by another process past its busy timeout.
    StateBusy,
    /// Anything else: a bug, QEMU failing, a broken image.
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for what its host group does not allow.
    #[error("{0}")]
    Invalid(String),
    /// No such VM, host group, commit or secret.
    #[error("{0}")]
    NotFound(String),
    /// The VM (or commit) is in a state the operation cannot start from.
    #[error("{0}")]
    Conflict(String),
    /// The operation is not allowed on this object (a config's count VM).
    #[error("{0}")]
    Forbidden(String),
    /// A wait the caller bounded ran out.
    #[error("{0}")]
    Timeout(String),
    /// The host cannot take more right now: the capacity budget is used up, or the daemon is
    /// stopping.
    #[error("{0}")]
    Unavailable(String),
    /// The VM booted but the tenant's userdata script failed; the VM is kept.
    #[error("{0}")]
    UserdataFailed(String),
    /// The guest agent failed or refused (its own 4xx keep their status).
    #[error("guest agent: {0}")]
    Guest(#[from] slicer_agent_client::AgentError),
    /// A failure of the host side. Printed as its whole chain of causes (`cause: its cause:
    /// …`); `cause` is not this error's `source()`, so that a chain-aware formatter does not
    /// print the chain twice. [`Error::host_cause`] hands it out.
    #[error("{cause}")]
    Host { fault: HostFault, cause: HostCause },
}

/// What a host failure came from: the error with its chain of causes, each link its own
/// type (`find` one by type).
pub struct HostCause(Box<dyn StdError + Send + Sync + 'static>);

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HostCause {
    fn from(e: E) -> HostCause {
        HostCause(Box::new(e))
    }
}

/// A host failure known only by its words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

/// A host failure with what was being done when it happened, above its cause.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
struct Context {
    context: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HostCause {
    /// A cause that is only text.
    pub fn msg(m: impl Into<String>) -> HostCause {
        HostCause(Box::new(Message(m.into())))
    }

    /// `e`, under what was being done: `context: e: e's causes`.
    pub fn context(e: impl Into<HostCause>, context: impl Into<String>) -> HostCause {
        HostCause(Box::new(Context {
            context: context.into(),
            source: e.into().0,
        }))
    }

    /// The error, then its causes, outermost first.
    pub fn chain(&self) -> impl Iterator<Item = &(dyn StdError + 'static)> {
        let top: &(dyn StdError + 'static) = &*self.0;
        slicer_error::sources(top)
    }

    /// The first link of the chain that is a `T`.
    pub fn find<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.chain().find_map(|l| l.downcast_ref::<T>())
    }
}

/// The whole chain, each link once: `error: cause: cause's cause`.
impl std::fmt::Display for HostCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&slicer_error::chain_string(&*self.0))
    }
}

impl std::fmt::Debug for HostCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Error {
    pub fn invalid(m: impl Into<String>) -> Error {
        Error::Invalid(m.into())
    }
    pub fn not_found(m: impl Into<String>) -> Error {
        Error::NotFound(m.into())
    }
    pub fn conflict(m: impl Into<String>) -> Error {
        Error::Conflict(m.into())
    }
    pub fn forbidden(m: impl Into<String>) -> Error {
        Error::Forbidden(m.into())
    }
    pub fn timeout(m: impl Into<String>) -> Error {
        Error::Timeout(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Error {
        Error::Unavailable(m.into())
    }

    /// A host-side failure, classified by walking its chain of causes for the I/O and SQLite
    /// errors that are the host's state rather than a bug. Its text decides only what no
    /// type tells: a child program's stderr (qemu-img, mkfs) carried as a message.
    pub fn host(e: impl Into<HostCause>) -> Error {
        let cause: HostCause = e.into();
        let fault = match cause.chain().find_map(fault_of) {
            Some(f) => f,
            None => fault_of_text(&cause.to_string()),
        };
        Error::Host { fault, cause }
    }

    /// A host-side failure known only by its text (a wait that ended with a reason).
    pub fn host_msg(m: impl Into<String>) -> Error {
        Error::host(HostCause::msg(m))
    }

    /// What a host failure came from (its chain of causes below it), for a caller to match
    /// a lower crate's error.
    pub fn host_cause(&self) -> Option<&HostCause> {
        match self {
            Error::Host { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// The fault a link of a chain is, by its type.
fn fault_of(cause: &(dyn std::error::Error + 'static)) -> Option<HostFault> {
    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
        return (io.raw_os_error() == Some(libc::ENOSPC)).then_some(HostFault::DiskFull);
    }
    if let Some(rusqlite::Error::SqliteFailure(f, _)) = cause.downcast_ref::<rusqlite::Error>() {
        return match f.code {
            rusqlite::ErrorCode::DiskFull => Some(HostFault::DiskFull),
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked => Some(HostFault::StateBusy),
            _ => None,
        };
    }
    None
}

/// A child program (qemu-img, QEMU, mkfs) reports ENOSPC only as text on its stderr, which
/// reaches us as a message; so do errors a guest wait turned into a reason. Those are told
/// apart by their words.
fn fault_of_text(text: &str) -> HostFault {
    if [
        "No space left on device",
        "database or disk is full",
        "database is full",
    ]
    .iter()
    .any(|w| text.contains(w))
    {
        return HostFault::DiskFull;
    }
    if ["database is locked", "database is busy", "database file is locked"]
        .iter()
        .any(|w| text.contains(w))
    {
        return HostFault::StateBusy;
    }
    HostFault::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(e: Error) -> HostFault {
        match e {
            Error::Host { fault, .. } => fault,
            other => panic!("not a host error: {other:?}"),
        }
    }

    #[test]
    fn host_faults_are_found_by_type_through_the_chain() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(fault(Error::host(io)), HostFault::DiskFull);
        let wrapped = HostCause::context(std::io::Error::from_raw_os_error(libc::ENOSPC), "writing the disk");
        assert_eq!(fault(Error::host(wrapped)), HostFault::DiskFull);
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
        assert_eq!(fault(Error::host(busy)), HostFault::StateBusy);
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        assert_eq!(fault(Error::host(full)), HostFault::DiskFull);
        assert_eq!(fault(Error::host_msg("boom")), HostFault::Other);
        assert_eq!(
            fault(Error::host_msg(
                "qemu-img: error while writing: No space left on device"
            )),
            HostFault::DiskFull
        );
        // The state database's own error, with its context above SQLite's.
        let db = crate::state::Error::Sql {
            context: "recording VM a-1".into(),
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None),
        };
        let e = Error::host(db);
        assert!(e.to_string().starts_with("recording VM a-1: "), "{e}");
        assert_eq!(fault(e), HostFault::DiskFull);
        let store = crate::secrets::StoreError::Io {
            context: "writing k".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(fault(Error::host(store)), HostFault::DiskFull);
    }
}
