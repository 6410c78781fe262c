//! `GET /vm/{h}/fs/watch`: filesystem events from the guest's inotify as Server-Sent Events,
//! filtered by event type and glob patterns, coalesced per (type, path) within `debounce`,
//! ended by `one_shot`, `max_events` or `timeout`; a heartbeat comment every 15 s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use slicer_agent_proto::{WatchEvent, WatchRequest};
use tokio::time::Instant;

use super::{parse_go_duration, query_bool, query_one, query_pairs, Shared};
use crate::api::error::ApiErr;
use crate::manager::GuestStream;

/// Longest event line accepted from the guest.
const MAX_LINE: usize = 1 << 20;

const KINDS: [&str; 5] = ["create", "write", "remove", "rename", "chmod"];

/// Longest pattern accepted (bytes).
const MAX_PATTERN: usize = 256;
/// Most patterns one watch may give.
const MAX_PATTERNS: usize = 32;
/// Words of a set of pattern positions (0..=MAX_PATTERN).
const WORDS: usize = (MAX_PATTERN + 1).div_ceil(64);
type Bits = [u64; WORDS];

fn and(a: &Bits, b: &Bits) -> Bits {
    std::array::from_fn(|i| a[i] & b[i])
}

fn or(a: &Bits, b: &Bits) -> Bits {
    std::array::from_fn(|i| a[i] | b[i])
}

/// Every position moved one token on.
fn shl(a: &Bits) -> Bits {
    std::array::from_fn(|i| (a[i] << 1) | if i > 0 { a[i - 1] >> 63 } else { 0 })
}

/// A shell-style glob: `*` any run without `/`, `**` (or more stars) any run, `?` one
/// character but `/`, any other byte itself.
///
/// Matching runs the pattern as a set of positions (a bit-parallel NFA) over the path once:
/// O(path length) word operations however many stars the pattern has. (Backtracking over each
/// `**` was exponential: `**a**a**a**a**a**b` against 4 KiB of `a` would not finish.)
struct Glob {
    /// Positions whose token is that literal byte.
    lit: Box<[Bits; 256]>,
    /// Positions whose token is `?`.
    one: Bits,
    /// Positions whose token is `*`.
    run: Bits,
    /// Positions whose token is `**`.
    any: Bits,
    /// The position after the last token: a match ends there.
    end: usize,
}

impl Glob {
    fn new(pat: &str) -> Result<Glob, String> {
        if pat.len() > MAX_PATTERN {
            return Err(format!("a pattern is longer than {MAX_PATTERN} bytes"));
        }
        let mut g = Glob {
            lit: Box::new([[0; WORDS]; 256]),
            one: [0; WORDS],
            run: [0; WORDS],
            any: [0; WORDS],
            end: 0,
        };
        let p = pat.as_bytes();
        let mut i = 0;
        while i < p.len() {
            let (w, bit) = (g.end / 64, 1u64 << (g.end % 64));
            match p[i] {
                b'*' => {
                    let stars = p[i..].iter().take_while(|b| **b == b'*').count();
                    // A run of stars is one token: `***` matches what `**` does.
                    if stars >= 2 {
                        g.any[w] |= bit;
                    } else {
                        g.run[w] |= bit;
                    }
                    i += stars;
                }
                b'?' => {
                    g.one[w] |= bit;
                    i += 1;
                }
                c => {
                    g.lit[c as usize][w] |= bit;
                    i += 1;
                }
            }
            g.end += 1;
        }
        Ok(g)
    }

    /// Adds the positions after a star (a star may match nothing). Star runs are one token,
    /// so one step is the whole closure.
    fn close(&self, b: Bits) -> Bits {
        or(&b, &shl(&and(&b, &or(&self.run, &self.any))))
    }

    fn is_match(&self, s: &[u8]) -> bool {
        let mut first = [0; WORDS];
        first[0] = 1;
        let mut cur = self.close(first);
        for &c in s {
            if cur.iter().all(|w| *w == 0) {
                return false;
            }
            let mut step = and(&cur, &self.lit[c as usize]);
            let stay = if c == b'/' {
                and(&cur, &self.any)
            } else {
                step = or(&step, &and(&cur, &self.one));
                and(&cur, &or(&self.run, &self.any))
            };
            cur = self.close(or(&shl(&step), &stay));
        }
        cur[self.end / 64] & (1 << (self.end % 64)) != 0
    }
}

fn matches(patterns: &[Glob], path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    patterns.is_empty()
        || patterns
            .iter()
            .any(|g| g.is_match(path.as_bytes()) || g.is_match(base.as_bytes()))
}

/// Which guest events a watch passes on, how it coalesces them, and when it ends.
struct Filter {
    kinds: Vec<String>,
    patterns: Vec<Glob>,
    debounce: Duration,
    /// Events to send before ending (`one_shot` is 1).
    limit: Option<u64>,
    timeout: Option<Duration>,
}

/// The values of query `k`, repeated or comma-separated.
fn list(pairs: &[(String, String)], k: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(key, _)| key == k)
        .flat_map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
        .collect()
}

/// Query `k` as a Go duration (`200ms`, `1m`), `default` when absent.
fn duration(pairs: &[(String, String)], k: &str, default: Option<Duration>) -> Result<Option<Duration>, ApiErr> {
    match query_one(pairs, k) {
        None | Some("") => Ok(default),
        Some(v) => parse_go_duration(v)
            .map(Some)
            .ok_or_else(|| ApiErr::bad_request(format!("query {k}: {v:?} is not a duration such as 200ms or 1m"))),
    }
}

/// The watched paths, each checked as a guest path.
fn paths(pairs: &[(String, String)]) -> Result<Vec<String>, ApiErr> {
    let paths = list(pairs, "paths");
    if paths.is_empty() {
        return Err(ApiErr::bad_request("query paths is required (repeat it for more)"));
    }
    paths
        .into_iter()
        .map(|p| super::cp::guest_path(&[("path".to_string(), p)]))
        .collect()
}

impl Filter {
    fn parse(pairs: &[(String, String)]) -> Result<Filter, ApiErr> {
        let patterns = list(pairs, "patterns");
        if patterns.len() > MAX_PATTERNS {
            return Err(ApiErr::bad_request(format!(
                "query patterns: at most {MAX_PATTERNS} patterns"
            )));
        }
        let patterns: Vec<Glob> = patterns
            .iter()
            .map(|p| Glob::new(p).map_err(|e| ApiErr::bad_request(format!("query patterns: {e}"))))
            .collect::<Result<_, _>>()?;
        let mut kinds = list(pairs, "events");
        if kinds.is_empty() || kinds.iter().any(|k| k == "all") {
            kinds = KINDS.iter().map(|k| k.to_string()).collect();
        }
        if let Some(bad) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
            return Err(ApiErr::bad_request(format!(
                "query events: {bad:?} is not create, write, remove, rename, chmod or all"
            )));
        }
        let debounce = duration(pairs, "debounce", Some(Duration::from_millis(200)))?.unwrap_or_default();
        let timeout = duration(pairs, "timeout", None)?;
        let max_events = match query_one(pairs, "max_events") {
            None | Some("") => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| ApiErr::bad_request(format!("query max_events: {v:?} is not a number")))?,
            ),
        };
        let one_shot = query_bool(pairs, "one_shot")?;
        Ok(Filter {
            kinds,
            patterns,
            debounce,
            limit: if one_shot { Some(1) } else { max_events },
            timeout,
        })
    }

    /// Whether `e` passes the kind and pattern filters (an overflow always does).
    fn wants(&self, e: &WatchEvent) -> bool {
        e.kind == "overflow" || (self.kinds.contains(&e.kind) && matches(&self.patterns, &e.path))
    }
}

pub async fn watch(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    headers: HeaderMap,
    q: RawQuery,
) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let paths = paths(&pairs)?;
    let filter = Filter::parse(&pairs)?;
    let recursive = query_bool(&pairs, "recursive")?;
    if let Some(v) = headers.get("last-event-id") {
        if v.to_str().ok().and_then(|s| s.parse::<u64>().ok()).is_none() {
            return Err(ApiErr::bad_request("header Last-Event-ID is not a number"));
        }
    }
    let events = st.manager.watch(&hostname, &WatchRequest { paths, recursive }).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(relay(events, filter, tx));
    let stream = super::receiver_stream(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The SSE event of the `n`th guest event sent.
fn sse_event(n: u64, e: &WatchEvent) -> Event {
    let mut data = serde_json::json!({
        "id": n,
        "type": e.kind,
        "path": e.path,
        "timestamp": crate::api::time::rfc3339_ms(e.timestamp_ms),
        "size": e.size,
        "isDir": e.is_dir,
    });
    if e.kind == "overflow" {
        data["message"] = "the guest kernel dropped events".into();
    }
    Event::default().id(n.to_string()).event("watch").data(data.to_string())
}

/// Passes the guest's events that `f` wants on to `tx`, until the guest's stream, the
/// client, the timeout or the event limit ends it.
async fn relay(mut events: GuestStream, f: Filter, tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>) {
    // A timeout past what the clock can represent is no deadline.
    let deadline = f.timeout.and_then(|t| Instant::now().checked_add(t));
    let mut last: HashMap<(String, String), Instant> = HashMap::new();
    let mut sent = 0u64;
    let mut lines = 0u32;
    loop {
        // Lines already read come back without an await: give the worker back now and
        // then, however many of them get dropped.
        lines = lines.wrapping_add(1);
        if lines.is_multiple_of(super::YIELD_EVERY) {
            tokio::task::yield_now().await;
        }
        let line = tokio::select! {
            l = events.next_line(MAX_LINE) => l,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => return,
            _ = tx.closed() => return,
        };
        let Ok(Some(line)) = line else { return };
        let Ok(e) = serde_json::from_slice::<WatchEvent>(&line) else {
            continue;
        };
        if !f.wants(&e) {
            continue;
        }
        let key = (e.kind.clone(), e.path.clone());
        let now = Instant::now();
        if last.get(&key).is_some_and(|t| now.duration_since(*t) < f.debounce) {
            continue;
        }
        last.insert(key, now);
        last.retain(|_, t| now.duration_since(*t) < f.debounce.max(Duration::from_secs(1)));
        sent += 1;
        if tx.send(Ok(sse_event(sent, &e))).await.is_err() || f.limit.is_some_and(|l| sent >= l) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str, s: &str) -> bool {
        Glob::new(p).unwrap().is_match(s.as_bytes())
    }

    /// The backtracking matcher this replaced: the reference for small inputs.
    fn reference(pat: &[u8], s: &[u8]) -> bool {
        match (pat.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) if pat.get(1) == Some(&b'*') => (0..=s.len()).any(|i| reference(&pat[2..], &s[i..])),
            (Some(b'*'), _) => {
                for i in 0..=s.len() {
                    if reference(&pat[1..], &s[i..]) {
                        return true;
                    }
                    if s.get(i) == Some(&b'/') {
                        return false;
                    }
                }
                false
            }
            (Some(b'?'), Some(c)) if *c != b'/' => reference(&pat[1..], &s[1..]),
            (Some(p), Some(c)) if p == c => reference(&pat[1..], &s[1..]),
            _ => false,
        }
    }

    #[test]
    fn globs() {
        assert!(glob("*.txt", "a.txt"));
        assert!(!glob("*.txt", "d/a.txt"));
        assert!(glob("/tmp/**/x?.log", "/tmp/a/b/x1.log"));
        assert!(glob("**", ""));
        assert!(glob("a***b", "a/x/b"));
        assert!(!glob("a?b", "a/b"));
        let g = |p: &str| Glob::new(p).unwrap();
        assert!(matches(&[g("*.txt")], "/tmp/w/a.txt"));
        assert!(!matches(&[g("*.log")], "/tmp/w/a.txt"));
        assert!(matches(&[], "/anything"));
        assert!(Glob::new(&"a".repeat(MAX_PATTERN)).is_ok());
        assert!(Glob::new(&"*".repeat(MAX_PATTERN + 1)).is_err());
    }

    #[test]
    fn globs_agree_with_the_backtracking_matcher() {
        // Every pattern of up to 5 tokens over a small alphabet against random short paths.
        let alphabet = [b'a', b'b', b'/', b'*', b'?'];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..20_000 {
            let pat: Vec<u8> = (0..next(7)).map(|_| alphabet[next(5)]).collect();
            let path: Vec<u8> = (0..next(9)).map(|_| alphabet[next(3)]).collect();
            let p = String::from_utf8(pat.clone()).unwrap();
            assert_eq!(
                Glob::new(&p).unwrap().is_match(&path),
                reference(&pat, &path),
                "{p:?} against {:?}",
                String::from_utf8_lossy(&path)
            );
        }
    }

    /// What a tenant can ask for against what a guest can send: the backtracking matcher
    /// would not finish this (each `**` tries every split of the rest).
    #[test]
    fn a_pathological_pattern_against_a_long_path_is_linear() {
        let t0 = std::time::Instant::now();
        let path = "a".repeat(4096);
        assert!(!glob("**a**a**a**a**a**b", &path));
        assert!(glob("**a**a**a**a**a**a", &path));
        let worst = "*a".repeat(MAX_PATTERN / 2);
        assert!(!glob(&worst, &format!("{}b", "a".repeat(64 << 10))));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}
