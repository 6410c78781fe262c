//! Times in answers: RFC 3339, UTC (the manager and guests give them as numbers).

use std::time::SystemTime;

/// A time given in ns since the Unix epoch (as guests report it), in RFC 3339; empty when out
/// of range.
pub fn rfc3339_ns(ns: i128) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// [`rfc3339_ns`] of a time in ms.
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339_ns(i128::from(ms) * 1_000_000)
}

/// [`rfc3339_ns`] of a system time.
pub fn rfc3339(t: SystemTime) -> String {
    let ns = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    rfc3339_ns(ns)
}

/// The time now, in RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(rfc3339_ns(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_500), "1970-01-01T00:00:01.5Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ns(i128::MAX), "");
    }
}
