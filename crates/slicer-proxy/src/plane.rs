//! What the listener (`server`) and the interceptor (`mitm`) share: the policy in force, where
//! decisions go, how upstreams are reached, the mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::control::{Decision, Mode, Stats};
use crate::rules::{ClientPolicy, Policy};
use crate::upstream::Upstream;

/// The policy in force; replaced whole when the daemon pushes a state.
#[derive(Default)]
pub struct PolicyCell(RwLock<Arc<Policy>>);

impl PolicyCell {
    pub fn get(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, p: Policy) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }
}

/// Running totals (sent to the daemon as [`Stats`]).
#[derive(Default)]
pub struct Counters {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub open_connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub dropped_events: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            allowed: g(&self.allowed),
            denied: g(&self.denied),
            unauthenticated: g(&self.unauthenticated),
            bytes_up: g(&self.bytes_up),
            bytes_down: g(&self.bytes_down),
            open_connections: g(&self.open_connections),
            refused_connections: g(&self.refused_connections),
            dropped_events: g(&self.dropped_events),
        }
    }
}

/// Where decisions go: one log line each on stderr, the counters, and (bounded, dropped when
/// full) the daemon.
pub struct Events {
    pub counters: Counters,
    tx: tokio::sync::mpsc::Sender<Decision>,
}

/// Decisions waiting for the daemon before new ones are dropped (and counted).
pub const EVENT_QUEUE: usize = 4096;

impl Events {
    pub fn new() -> (Events, tokio::sync::mpsc::Receiver<Decision>) {
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        (
            Events {
                counters: Counters::default(),
                tx,
            },
            rx,
        )
    }

    pub fn record(&self, d: Decision) {
        let c = &self.counters;
        if d.allow {
            c.allowed.fetch_add(1, Ordering::Relaxed);
        } else if d.reason == "no-token" || d.reason == "bad-token" {
            c.unauthenticated.fetch_add(1, Ordering::Relaxed);
        } else {
            c.denied.fetch_add(1, Ordering::Relaxed);
        }
        c.bytes_up.fetch_add(d.bytes_up, Ordering::Relaxed);
        c.bytes_down.fetch_add(d.bytes_down, Ordering::Relaxed);
        eprintln!("{}", d.log_line());
        if self.tx.try_send(d).is_err() {
            c.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One tunnel or proxied connection after authentication.
#[derive(Clone)]
pub struct Tunnel {
    pub client: Arc<ClientPolicy>,
    /// Normalized host (`rules::normalize_host`).
    pub host: String,
    pub port: u16,
    /// Denied at CONNECT and kept open only to log the first inner request (audit mode).
    pub audit_only: bool,
}

/// Everything a connection handler needs.
pub struct Plane {
    pub policy: PolicyCell,
    pub events: Events,
    pub upstream: Upstream,
    pub mode: Mode,
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
