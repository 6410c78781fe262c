//! What the VM library's operations fail with: the VM's own state (a bad spec, not running, no
//! saved state, QEMU gone, the agent silent), templates and captures, and the errors of the
//! crates below (hypervisor, storage, images, jail, agent), each kept as the source so a caller
//! can walk the chain down to an `std::io::Error`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM's name or resources are not acceptable.
    #[error("{0}")]
    InvalidSpec(String),
    /// The VM is not in the state the operation needs (not running, no saved state, its
    /// directory exists already).
    #[error("{0}")]
    State(String),
    /// QEMU exited while the VM was starting, loading or being captured.
    #[error("{0}")]
    QemuExited(String),
    /// The guest did not become ready (its agent did not answer in time).
    #[error("{0}")]
    NotReady(String),
    /// A template or capture is missing, unusable, failed to build, or the host cannot make one.
    #[error("{0}")]
    Template(String),
    /// A guest step of a template build (sync) failed.
    #[error("{0}")]
    Guest(String),
    /// A system call or file operation failed (printed as `context`, the cause after it by a
    /// chain-aware formatter, as [`Error::Context`] is: anyhow's `{:#}` would repeat it).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An I/O error without more to say (not transparent, so that the `std::io::Error` is a
    /// link of the chain a caller walks).
    #[error("I/O error")]
    Os(#[from] std::io::Error),
    #[error(transparent)]
    Hypervisor(#[from] slicer_hypervisor::Error),
    #[error(transparent)]
    Storage(#[from] slicer_storage::Error),
    #[error(transparent)]
    Image(#[from] slicer_image::Error),
    #[error(transparent)]
    Jail(#[from] slicer_jail::Error),
    #[error(transparent)]
    Agent(#[from] slicer_agent_client::AgentError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A bounded wait ran out (the context says which).
    #[error(transparent)]
    TimedOut(#[from] tokio::time::error::Elapsed),
    /// A blocking task (a copy) panicked or was cancelled.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    /// What was being done when `source` failed (printed by a chain-aware formatter, such as
    /// anyhow's `{:#}`, as `context: source`).
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// This error as the source of one saying what was being done.
    pub fn context(self, context: impl Into<String>) -> Error {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The failure under any [`Error::Context`] layers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            e => e,
        }
    }
}

/// `.context()` for this crate's results, in the manner of anyhow's: the error becomes the
/// source of an [`Error::Context`].
pub(crate) trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.into(),
            source: Box::new(e.into()),
        })
    }
    fn with_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().into(),
            source: Box::new(e.into()),
        })
    }
}

/// A missing value is a VM in a state the operation cannot use.
impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| Error::State(context.into()))
    }
    fn with_context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::State(f().into()))
    }
}

/// `return Err(Error::$kind(format!(...)))`.
macro_rules! fail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::$kind(format!($($arg)*)))
    };
}

/// [`fail!`] unless `$cond` holds.
macro_rules! check {
    ($cond:expr, $kind:ident, $($arg:tt)*) => {
        if !$cond {
            $crate::error::fail!($kind, $($arg)*);
        }
    };
}

pub(crate) use {check, fail};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_is_printed_once_in_the_chain() {
        let e = Error::Io {
            context: "memfd_create".into(),
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        let text = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(
            text,
            format!("memfd_create: {}", std::io::Error::from_raw_os_error(libc::EMFILE))
        );
    }

    #[test]
    fn the_chain_reaches_the_io_error() {
        let e: Result<()> = Err(std::io::Error::from_raw_os_error(libc::ENOSPC)).context("writing the state");
        let e = e.unwrap_err();
        assert!(slicer_error::is_no_space(&e));
        assert!(matches!(e.root(), Error::Os(_)));
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e)),
            format!(
                "writing the state: I/O error: {}",
                std::io::Error::from_raw_os_error(libc::ENOSPC)
            )
        );
    }
}
