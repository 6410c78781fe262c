//! The daemon's REST API: the JSON shapes (compatible with SlicerVM's SDKs), its routes
//! ([`routes`]) and a typed client ([`ApiClient`], one method per route).

mod calls;
pub mod client;
/// Line splitting for NDJSON answers (shared with the agent client, which reads guest lines).
pub use slicer_agent_proto::lines;
pub mod proxy;
pub mod query;
pub mod routes;
pub mod types;

pub use calls::{NodeFilter, Pairs, Streamed};
pub use client::{ApiClient, ApiError};
pub use proxy::*;
pub use types::*;

/// A VM's `arch` on the wire (create and relaunch answers, node lists, a VM's description): Go's
/// name (GOARCH) of the x86_64 guests slicer runs, as SlicerVM writes it in a create's answer
/// and in `/info`. (Host groups' `arch` is `x86_64`, as in SlicerVM's `GET /hostgroup`.)
pub const VM_ARCH: &str = "amd64";

/// A size for people: whole GiB as `20 GiB`, other sizes of a GiB or more with one decimal
/// (`1.5 GiB`), smaller ones in whole MiB (`512 MiB`). The daemon's config errors and the
/// CLI's tables both print sizes with it.
pub fn human_bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{} MiB", b >> 20)
    }
}

/// Parses a Go duration such as `5m`, `1m30s`, `250ms`.
pub fn parse_go_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * secs;
    }
    // A client may send any number: out of range is an error, not a panic.
    std::time::Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(parse_go_duration("99999999999999999999999h"), None);
    }
}
