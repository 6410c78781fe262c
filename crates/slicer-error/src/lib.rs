//! Error-chain helpers shared by every slicer crate: one way to print an error's source chain
//! (each cause once) and one way to ask whether a full disk (ENOSPC) is somewhere in it.
//!
//! It is its own crate, with `libc` as its only dependency, because the crates that need it
//! (`slicer-image`, `slicer-storage`, `slicer-net`, `slicer-hypervisor`, the guest agent) share
//! no lower crate that could hold it.

use std::error::Error as StdError;
use std::fmt;

/// The error and its sources, outermost first.
pub fn sources<'a>(e: &'a (dyn StdError + 'static)) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |e: &&'a (dyn StdError + 'static)| (*e).source())
}

/// Writes `message`, and with `{:#}` the chain from `source` down after it, each link as
/// `: <link>`, the way anyhow prints one. Code that formats such an error alone with `{:#}`
/// still sees the cause (e.g. "No space left on device"), and anyhow's own `{:#}` (which shows
/// each cause with `{}`) does not repeat it. For `#[error(fmt = ...)]` functions of thiserror
/// enums whose variant keeps its cause as `#[source]`.
pub fn write_chain(f: &mut fmt::Formatter, message: fmt::Arguments, source: &(dyn StdError + 'static)) -> fmt::Result {
    f.write_fmt(message)?;
    if f.alternate() {
        for e in sources(source) {
            write!(f, ": {e}")?;
        }
    }
    Ok(())
}

/// The error and every cause under it, joined by `": "` (for a message that must carry the
/// whole chain as text, e.g. an answer to a client).
pub fn chain_string(e: &(dyn StdError + 'static)) -> String {
    let mut s = String::new();
    for (i, c) in sources(e).enumerate() {
        if i > 0 {
            s.push_str(": ");
        }
        s.push_str(&c.to_string());
    }
    s
}

/// Whether the host's disk is full: an `std::io::Error` with ENOSPC anywhere in the chain.
pub fn is_no_space(e: &(dyn StdError + 'static)) -> bool {
    sources(e).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write_chain(f, format_args!("writing the state"), &self.0)
        }
    }

    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    fn full() -> Outer {
        Outer(std::io::Error::from_raw_os_error(libc::ENOSPC))
    }

    #[test]
    fn the_chain_is_printed_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(full().to_string(), "writing the state");
        assert_eq!(format!("{:#}", full()), format!("writing the state: {io}"));
        let any = format!("{:#}", anyhow::Error::from(full()));
        assert_eq!(any, format!("writing the state: {io}"));
        assert_eq!(chain_string(&full()), format!("writing the state: {io}"));
    }

    #[test]
    fn enospc_is_found_down_the_chain() {
        assert!(is_no_space(&full()));
        assert!(!is_no_space(&Outer(std::io::Error::from_raw_os_error(libc::EIO))));
        assert_eq!(sources(&full()).count(), 2);
    }
}
