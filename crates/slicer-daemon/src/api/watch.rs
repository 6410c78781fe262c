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

/// Longest event line accepted from the guest.
const MAX_LINE: usize = 1 << 20;

const KINDS: [&str; 5] = ["create", "write", "remove", "rename", "chmod"];

/// Shell-style glob: `*` any run without `/`, `**` any run, `?` one character.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) if pat.get(1) == Some(&b'*') => {
            let rest = &pat[2..];
            (0..=s.len()).any(|i| glob(rest, &s[i..]))
        }
        (Some(b'*'), _) => {
            let rest = &pat[1..];
            for i in 0..=s.len() {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if s.get(i) == Some(&b'/') {
                    return false;
                }
            }
            false
        }
        (Some(b'?'), Some(c)) if *c != b'/' => glob(&pat[1..], &s[1..]),
        (Some(p), Some(c)) if p == c => glob(&pat[1..], &s[1..]),
        _ => false,
    }
}

fn matches(patterns: &[String], path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    patterns.is_empty()
        || patterns
            .iter()
            .any(|p| glob(p.as_bytes(), path.as_bytes()) || glob(p.as_bytes(), base.as_bytes()))
}

pub async fn watch(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    headers: HeaderMap,
    q: RawQuery,
) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let all = |k: &str| -> Vec<String> {
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
    };
    let paths = all("paths");
    if paths.is_empty() {
        return Err(ApiErr::bad_request("query paths is required (repeat it for more)"));
    }
    let paths: Vec<String> = paths
        .into_iter()
        .map(|p| super::cp::guest_path(&[("path".to_string(), p)]))
        .collect::<Result<_, _>>()?;
    let patterns = all("patterns");
    let mut kinds = all("events");
    if kinds.is_empty() || kinds.iter().any(|k| k == "all") {
        kinds = KINDS.iter().map(|k| k.to_string()).collect();
    }
    if let Some(bad) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        return Err(ApiErr::bad_request(format!(
            "query events: {bad:?} is not create, write, remove, rename, chmod or all"
        )));
    }
    let duration = |k: &str, default: Option<Duration>| -> Result<Option<Duration>, ApiErr> {
        match query_one(&pairs, k) {
            None | Some("") => Ok(default),
            Some(v) => parse_go_duration(v)
                .map(Some)
                .ok_or_else(|| ApiErr::bad_request(format!("query {k}: {v:?} is not a duration such as 200ms or 1m"))),
        }
    };
    let debounce = duration("debounce", Some(Duration::from_millis(200)))?.unwrap_or_default();
    let timeout = duration("timeout", None)?;
    let max_events = match query_one(&pairs, "max_events") {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiErr::bad_request(format!("query max_events: {v:?} is not a number")))?,
        ),
    };
    let one_shot = query_bool(&pairs, "one_shot")?;
    let recursive = query_bool(&pairs, "recursive")?;
    if let Some(v) = headers.get("last-event-id") {
        if v.to_str().ok().and_then(|s| s.parse::<u64>().ok()).is_none() {
            return Err(ApiErr::bad_request("header Last-Event-ID is not a number"));
        }
    }
    let limit = if one_shot { Some(1) } else { max_events };

    let r = st.manager.active(&hostname)?;
    let mut events =
        r.vm.agent()
            .watch(&WatchRequest { paths, recursive })
            .await
            .map_err(ApiErr::agent)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        // A timeout past what the clock can represent is no deadline.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut last: HashMap<(String, String), Instant> = HashMap::new();
        let mut sent = 0u64;
        loop {
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
            if e.kind != "overflow" && (!kinds.contains(&e.kind) || !matches(&patterns, &e.path)) {
                continue;
            }
            let key = (e.kind.clone(), e.path.clone());
            let now = Instant::now();
            if last.get(&key).is_some_and(|t| now.duration_since(*t) < debounce) {
                continue;
            }
            last.insert(key, now);
            last.retain(|_, t| now.duration_since(*t) < debounce.max(Duration::from_secs(1)));
            sent += 1;
            let mut data = serde_json::json!({
                "id": sent,
                "type": e.kind,
                "path": e.path,
                "timestamp": crate::manager::rfc3339_ms(e.timestamp_ms),
                "size": e.size,
                "isDir": e.is_dir,
            });
            if e.kind == "overflow" {
                data["message"] = "the guest kernel dropped events".into();
            }
            let ev = Event::default()
                .id(sent.to_string())
                .event("watch")
                .data(data.to_string());
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
            if limit.is_some_and(|l| sent >= l) {
                return;
            }
        }
    });
    let stream = super::receiver_stream(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"*.txt", b"a.txt"));
        assert!(!glob(b"*.txt", b"d/a.txt"));
        assert!(glob(b"/tmp/**/x?.log", b"/tmp/a/b/x1.log"));
        assert!(matches(&["*.txt".into()], "/tmp/w/a.txt"));
        assert!(!matches(&["*.log".into()], "/tmp/w/a.txt"));
        assert!(matches(&[], "/anything"));
    }
}
