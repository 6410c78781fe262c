//! Errors of the image store: building images (kernel, root file systems), importing disk
//! files, looking images up, and pulling them from registries ([`PullError`], wrapped as
//! [`Error::Pull`]). File operations keep their `std::io::Error` as the source, so a caller
//! can walk `std::error::Error::source()` down to it (for example with `slicer_error::is_no_space`).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::oci::PullError;

/// Everything that can fail in `slicer-image`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed; `context` says which (e.g. "writing /x/image.json").
    #[error(fmt = fmt_io)]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// JSON could not be read or written; `context` says which file or output.
    #[error(fmt = fmt_json)]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    /// A host program could not be started.
    #[error(fmt = fmt_spawn)]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A host program (`qemu-img`, `debugfs`) failed; `stderr` is its trimmed error output.
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    /// A build step failed; `tail` is the last lines of its log.
    #[error("{command} failed ({status}); last lines of {}:\n{tail}", log.display())]
    BuildStep {
        command: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    /// Host programs are missing.
    #[error("missing host tools: {}; install them with: apt-get install -y {}", tools.join(", "), packages.join(" "))]
    MissingTools { tools: Vec<String>, packages: Vec<String> },
    /// Building images needs root.
    #[error("building images needs root (debootstrap and chroot): run it with sudo")]
    NeedsRoot,
    /// The agent binary to put into images is missing or unusable; `message` says how.
    #[error("{message}")]
    Agent { message: String },
    /// The kernel refused options of the config fragment.
    #[error("the kernel config fragment asks for options the kernel did not accept: {}", rejected.join(", "))]
    KernelConfig { rejected: Vec<String> },
    /// No kernel has been built yet (every image boots it).
    #[error("no kernel built yet: run `slicer image build --variant min` (scripts/setup.sh does)")]
    NoKernel,
    /// A built-in image (`min`, `systemd`) is not built.
    #[error(fmt = fmt_not_built)]
    NotBuilt {
        name: String,
        manifest: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A built-in image lacks one of its files.
    #[error("image {name:?} is incomplete: {} is missing; run `slicer image build --variant {name}`", missing.display())]
    Incomplete { name: String, missing: PathBuf },
    /// A stored image lacks its root file system.
    #[error("{} is missing", path.display())]
    Missing { path: PathBuf },
    /// An image reference names nothing in the store.
    #[error(fmt = fmt_not_in_store)]
    NotInStore {
        image: String,
        /// What was asked for, when a pull would fetch it.
        reference: Option<String>,
    },
    /// A disk file or other input that cannot be used; `message` says why.
    #[error("{message}")]
    Unusable { message: String },
    /// Pulling or naming an OCI image failed.
    #[error(transparent)]
    Pull(#[from] PullError),
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

    /// An [`Error::Unusable`].
    pub(crate) fn unusable(message: impl Into<String>) -> Self {
        Error::Unusable {
            message: message.into(),
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

/// `.io_context(|| ...)` on io results: [`Error::Io`] with that context.
pub(crate) trait IoContext<T> {
    fn io_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

/// `.json_context(|| ...)` on serde_json results: [`Error::Json`] with that context.
pub(crate) trait JsonContext<T> {
    fn json_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T> JsonContext<T> for serde_json::Result<T> {
    fn json_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|source| Error::Json {
            context: context().into(),
            source,
        })
    }
}

/// File operations whose errors name the path (std::fs's do not).
pub(crate) mod fs {
    use super::{IoContext, Result};
    use std::path::Path;

    pub fn create_dir_all(p: impl AsRef<Path>) -> Result<()> {
        let p = p.as_ref();
        std::fs::create_dir_all(p).io_context(|| format!("creating {}", p.display()))
    }
    pub fn create_dir(p: impl AsRef<Path>) -> Result<()> {
        let p = p.as_ref();
        std::fs::create_dir(p).io_context(|| format!("creating {}", p.display()))
    }
    pub fn write(p: impl AsRef<Path>, data: impl AsRef<[u8]>) -> Result<()> {
        let p = p.as_ref();
        std::fs::write(p, data).io_context(|| format!("writing {}", p.display()))
    }
    pub fn read(p: impl AsRef<Path>) -> Result<Vec<u8>> {
        let p = p.as_ref();
        std::fs::read(p).io_context(|| format!("reading {}", p.display()))
    }
    pub fn read_to_string(p: impl AsRef<Path>) -> Result<String> {
        let p = p.as_ref();
        std::fs::read_to_string(p).io_context(|| format!("reading {}", p.display()))
    }
    pub fn rename(from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
        let (from, to) = (from.as_ref(), to.as_ref());
        std::fs::rename(from, to).io_context(|| format!("renaming {} to {}", from.display(), to.display()))
    }
    pub fn copy(from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<u64> {
        let (from, to) = (from.as_ref(), to.as_ref());
        std::fs::copy(from, to).io_context(|| format!("copying {} to {}", from.display(), to.display()))
    }
    pub fn remove_dir_all(p: impl AsRef<Path>) -> Result<()> {
        let p = p.as_ref();
        std::fs::remove_dir_all(p).io_context(|| format!("removing {}", p.display()))
    }
    pub fn remove_file(p: impl AsRef<Path>) -> Result<()> {
        let p = p.as_ref();
        std::fs::remove_file(p).io_context(|| format!("removing {}", p.display()))
    }
}

fn fmt_io(context: &str, source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

fn fmt_json(context: &str, source: &serde_json::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

fn fmt_spawn(command: &str, source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("starting {command}"), source)
}

fn fmt_not_built(name: &str, manifest: &Path, source: &std::io::Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(
        f,
        format_args!(
            "image {name:?} is not built (no {}): run `slicer image build --variant {name}`",
            manifest.display()
        ),
        source,
    )
}

fn fmt_not_in_store(image: &str, reference: &Option<String>, f: &mut fmt::Formatter) -> fmt::Result {
    write!(f, "image {image:?} is not in the store")?;
    if let Some(r) = reference {
        write!(f, ": run `slicer image pull {r}`")?;
    }
    Ok(())
}

fn fmt_context(context: &str, source: &Error, f: &mut fmt::Formatter) -> fmt::Result {
    slicer_error::write_chain(f, format_args!("{context}"), source)
}

/// `Result` of this crate.
pub type Result<T> = std::result::Result<T, Error>;
