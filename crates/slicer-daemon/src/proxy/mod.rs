//! Slicer Proxy's control plane: clients, their tokens (SHA-256 only) and rules, upstream
//! secrets, kept in the daemon's SQLite database (`state.db`, 0600) and pushed to every running
//! proxy over its control socket (`slicer_proxy::control`).
//!
//! Every admin change is one transaction; then the whole state gets a new generation, is written
//! to `<data dir>/proxy/state.json` (0600, atomic rename, `O_NOFOLLOW`; a proxy that starts
//! reads it) and sent to each connected proxy, and the change answers once every proxy that
//! said hello acknowledged it (at most [`ACK_WAIT`]; a dead proxy does not fail the call). A
//! task looks for proxies' sockets every second, garbage-collects expired rules and pushes
//! again when per-VM tokens went with their VMs. Decisions proxies report are counted in
//! `/metrics`, and the last denials of each client kept (bounded) for `suggest`.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rusqlite::{params, OptionalExtension, Transaction};
use slicer_api::{
    AddProxyAllowRequest, CreateProxyClientRequest, CreateProxySecretRequest, ProxyAllowRule, ProxyClient,
    ProxyClientCreated, ProxySecret, RemoveProxyAllowByTupleRequest,
};
use slicer_proxy::control::{self, Decision, FromProxy, ProxyState, SecretKind, StateClient, StateSecret, ToProxy};
use slicer_proxy::rules::{self, ClientPolicy, ConnectDecision, HostPattern, Policy, RequestDecision, Rule};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::manager::Error;
use crate::metrics::{GroupLabels, ProxyBytesLabels, ProxyDecisionLabels};
use crate::state::column::Text;
use crate::state::Db;

/// A failure of the proxy plane's files (its state file, its tables), with its chain of
/// causes as text: what the manager holds as a host failure's cause.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct ProxyError(anyhow::Error);

impl From<anyhow::Error> for ProxyError {
    fn from(e: anyhow::Error) -> ProxyError {
        ProxyError(e)
    }
}

mod admin;
mod decisions;
mod files;
mod link;
mod tables;

use decisions::keep_for_suggest;
pub use files::write_state_file;
use files::{private_dir, secure_db_file};
use tables::*;

/// Bounds on what admins (tenants of the API) can make the daemon hold and push.
pub const MAX_CLIENTS: usize = 10_000;
pub const MAX_RULES_PER_CLIENT: usize = 1_000;
pub const MAX_RULES: usize = 100_000;
pub const MAX_SECRETS: usize = 10_000;
pub const MAX_SECRET_VALUE: usize = 64 << 10;
/// All secret values together (the state travels as one line of at most 64 MiB).
pub const MAX_SECRET_BYTES: usize = 16 << 20;
/// Tokens of one client (the one shown at create and one per proxy-bound VM).
pub const MAX_TOKENS_PER_CLIENT: usize = 4_096;
pub const MIN_TOKEN_LEN: usize = 16;
pub const MAX_TOKEN_LEN: usize = 256;
/// Decisions kept for `suggest`.
pub const DECISIONS_PER_CLIENT: usize = 2_000;
pub const DECISIONS_TOTAL: usize = 50_000;
/// Longest an admin change waits for proxies to acknowledge it.
pub const ACK_WAIT: Duration = Duration::from_secs(2);
/// How often sockets are looked for and expired rules collected.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);
const HELLO_WAIT: Duration = Duration::from_secs(5);
const CONNECT_WAIT: Duration = Duration::from_secs(2);
const SEND_WAIT: Duration = Duration::from_secs(10);
/// Decisions buffered per link before they are written.
const DECISION_BATCH: usize = 256;

/// Secret types SlicerVM has that this daemon does not.
pub const UNSUPPORTED_SECRET_TYPES: &[&str] = &[
    "oauth-claude",
    "oauth-codex",
    "oauth-github-copilot",
    "oauth-xai",
    "oauth-client-creds",
    "github-app-user",
    "github-app",
];

/// The metric families the control plane updates (shared with `/metrics`).
#[derive(Clone)]
pub struct ProxyMetrics {
    pub decisions:
        prometheus_client::metrics::family::Family<ProxyDecisionLabels, prometheus_client::metrics::counter::Counter>,
    pub bytes: prometheus_client::metrics::family::Family<ProxyBytesLabels, prometheus_client::metrics::gauge::Gauge>,
    pub open: prometheus_client::metrics::family::Family<GroupLabels, prometheus_client::metrics::gauge::Gauge>,
    pub connected: prometheus_client::metrics::gauge::Gauge,
}

impl ProxyMetrics {
    pub fn of(m: &crate::metrics::Metrics) -> ProxyMetrics {
        ProxyMetrics {
            decisions: m.proxy_decisions.clone(),
            bytes: m.proxy_bytes.clone(),
            open: m.proxy_open_connections.clone(),
            connected: m.proxy_connected.clone(),
        }
    }
}

/// A control connection to one group's proxy.
struct Link {
    id: u64,
    /// The last generation the proxy acknowledged.
    acked: watch::Receiver<u64>,
    /// It said hello (only such proxies are waited for).
    hello: Arc<AtomicBool>,
}

pub struct ProxyAdmin {
    db: Db,
    data_dir: PathBuf,
    groups: Vec<String>,
    vm_ranges: Vec<String>,
    /// One change (and its push) at a time.
    write: tokio::sync::Mutex<()>,
    state: watch::Sender<Arc<ProxyState>>,
    links: Mutex<HashMap<String, Link>>,
    next_link: AtomicU64,
    metrics: ProxyMetrics,
    /// (count, sum of rowids) of the tokens at the last push: per-VM tokens go with their VM
    /// (a cascade in SQLite), which the housekeeping notices by this.
    tokens_seen: Mutex<(i64, i64)>,
    /// Ends the scan loop and every link (the daemon is stopping).
    closing: tokio_util::sync::CancellationToken,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn invalid(e: slicer_proxy::Error) -> Error {
    Error::invalid(e.to_string())
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::host(e)
}
pub fn new_token() -> String {
    format!("spt_{}", hex::encode(rand::random::<[u8; 32]>()))
}

fn check_literal_token(t: &str) -> Result<(), Error> {
    if t.len() < MIN_TOKEN_LEN || t.len() > MAX_TOKEN_LEN {
        return Err(Error::invalid(format!(
            "token: must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters (leave it out to have one made)"
        )));
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
    {
        return Err(Error::invalid(
            "token: only letters, digits, '-', '_', '.' and '~' (it is the password of a proxy URL)",
        ));
    }
    Ok(())
}
fn secret_kind(kind: &str) -> Result<SecretKind, Error> {
    match kind {
        "" | "bearer" => Ok(SecretKind::Bearer),
        "basic" => Ok(SecretKind::Basic),
        k if UNSUPPORTED_SECRET_TYPES.contains(&k) => Err(Error::invalid(format!(
            "type: {k:?} is not supported by this daemon (it injects bearer and basic secrets only)"
        ))),
        k => Err(Error::invalid(format!(
            "type: unknown secret type {:?} (bearer or basic)",
            k.escape_debug().to_string()
        ))),
    }
}

/// The address guests use for a proxy that said `bind` (an IP, maybe with a prefix).
pub fn proxy_host(bind: &str) -> Option<String> {
    let ip = bind.split('/').next().unwrap_or_default();
    match ip.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(a) => Some(a.to_string()),
        std::net::IpAddr::V6(a) => Some(format!("[{a}]")),
    }
}

/// The login environment of a proxy-bound VM, as `KEY=value` lines.
pub fn proxy_env(bind_host: &str, token: &str) -> String {
    let url = format!("http://proxy:{token}@{bind_host}:3128");
    let mut s = String::new();
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        s.push_str(&format!("{k}={url}\n"));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        s.push_str(&format!("{k}=localhost,127.0.0.1\n"));
    }
    s
}

impl ProxyAdmin {
    /// Opens the proxy tables in `db_path` (the daemon's state database) and writes the current
    /// state file.
    pub fn open(
        db_path: &Path,
        data_dir: &Path,
        groups: Vec<String>,
        vm_ranges: Vec<String>,
        metrics: ProxyMetrics,
    ) -> Result<Arc<ProxyAdmin>, ProxyError> {
        Ok(Self::open_tables(db_path, data_dir, groups, vm_ranges, metrics)?)
    }

    fn open_tables(
        db_path: &Path,
        data_dir: &Path,
        groups: Vec<String>,
        vm_ranges: Vec<String>,
        metrics: ProxyMetrics,
    ) -> anyhow::Result<Arc<ProxyAdmin>> {
        let db = Db::open(db_path)?;
        secure_db_file(db_path);
        let (state, _) = watch::channel(Arc::new(ProxyState::default()));
        let admin = Arc::new(ProxyAdmin {
            db,
            data_dir: data_dir.to_path_buf(),
            groups,
            vm_ranges,
            write: tokio::sync::Mutex::new(()),
            state,
            links: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            metrics,
            tokens_seen: Mutex::new((0, 0)),
            closing: tokio_util::sync::CancellationToken::new(),
        });
        {
            let mut conn = admin.db.conn();
            let tx = conn.transaction()?;
            collect_expired(&tx, now())?;
            bump_generation(&tx)?;
            tx.commit()?;
        }
        admin.publish().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(admin)
    }

    /// Starts looking for proxies (every [`SCAN_EVERY`]) and the housekeeping.
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let closing = self.closing.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SCAN_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = closing.cancelled() => return,
                }
                let Some(me) = Weak::upgrade(&weak) else { return };
                me.scan();
                if let Err(e) = me.housekeeping().await {
                    tracing::warn!("proxy state housekeeping: {e}");
                }
            }
        });
    }

    /// Stops looking for proxies and closes the links (the proxies keep enforcing the last
    /// state; they reconnect to the next daemon).
    pub fn stop(&self) {
        self.closing.cancel();
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state as it is in the database now (generation as recorded).
    fn build_state(&self, conn: &rusqlite::Connection) -> Result<ProxyState, Error> {
        let t = now();
        let mut clients: Vec<StateClient> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        {
            let mut st = conn
                .prepare_cached("SELECT name FROM proxy_clients ORDER BY name")
                .map_err(db_err)?;
            for name in st.query_map([], |r| r.get::<_, String>(0)).map_err(db_err)? {
                let name = name.map_err(db_err)?;
                index.insert(name.clone(), clients.len());
                clients.push(StateClient {
                    name,
                    ..StateClient::default()
                });
            }
            let mut st = conn
                .prepare_cached("SELECT client, sha256 FROM proxy_tokens ORDER BY rowid")
                .map_err(db_err)?;
            for row in st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(db_err)?
            {
                let (c, h) = row.map_err(db_err)?;
                if let Some(&i) = index.get(&c) {
                    clients[i].token_sha256.push(h);
                }
            }
            let mut st = conn
                .prepare_cached(
                    "SELECT client, rule FROM proxy_rules WHERE expires IS NULL OR expires > ?1 ORDER BY id",
                )
                .map_err(db_err)?;
            for row in st
                .query_map(params![t], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(db_err)?
            {
                let (c, json) = row.map_err(db_err)?;
                if let (Some(&i), Ok(w)) = (index.get(&c), serde_json::from_str::<ProxyAllowRule>(&json)) {
                    clients[i].rules.push(w);
                }
            }
        }
        let mut secrets = Vec::new();
        let mut st = conn
            .prepare_cached("SELECT name, host, kind, value FROM proxy_secrets ORDER BY name")
            .map_err(db_err)?;
        for row in st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    // A word this code does not know reads as bearer (as it always has).
                    r.get::<_, Text<SecretKind>>(2).map_or(SecretKind::Bearer, |k| k.0),
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(db_err)?
        {
            let (name, host, kind, value) = row.map_err(db_err)?;
            secrets.push(StateSecret {
                name,
                host,
                kind,
                value,
            });
        }
        Ok(ProxyState {
            generation: generation(conn)?,
            clients,
            secrets,
            vm_ranges: self.vm_ranges.clone(),
        })
    }

    /// Builds the state, writes the state file and hands it to every link. Callers hold
    /// `write` (or are `open`).
    fn publish(&self) -> Result<u64, Error> {
        let (state, fp) = {
            let conn = self.db.conn();
            (self.build_state(&conn)?, tokens_fingerprint(&conn)?)
        };
        *self.tokens_seen.lock().unwrap_or_else(|p| p.into_inner()) = fp;
        write_state_file(&self.data_dir, &state).map_err(|e| Error::host(ProxyError(e)))?;
        let g = state.generation;
        self.state.send_replace(Arc::new(state));
        Ok(g)
    }

    /// Waits (at most [`ACK_WAIT`]) until every proxy that said hello runs generation `g`.
    async fn wait_acks(&self, g: u64) {
        let waits: Vec<(String, watch::Receiver<u64>)> = self
            .links()
            .iter()
            .filter(|(_, l)| l.hello.load(Ordering::SeqCst))
            .map(|(group, l)| (group.clone(), l.acked.clone()))
            .collect();
        let all = futures_util::future::join_all(waits.into_iter().map(|(group, mut rx)| async move {
            if tokio::time::timeout(ACK_WAIT, rx.wait_for(|a| *a >= g)).await.is_err() {
                tracing::warn!(
                    group,
                    generation = g,
                    "a proxy did not acknowledge the new state within {ACK_WAIT:?}"
                );
            }
        }));
        all.await;
    }

    /// Runs `change` in one transaction (expired rules collected first), then publishes the new
    /// generation and waits for the proxies.
    async fn change<T>(&self, change: impl FnOnce(&Transaction<'_>) -> Result<T, Error>) -> Result<T, Error> {
        let _w = self.write.lock().await;
        let out = {
            let mut conn = self.db.conn();
            let tx = conn.transaction().map_err(db_err)?;
            collect_expired(&tx, now())?;
            let out = change(&tx)?;
            bump_generation(&tx)?;
            tx.commit().map_err(db_err)?;
            out
        };
        let g = self.publish()?;
        self.wait_acks(g).await;
        Ok(out)
    }

    /// Collects expired rules and notices tokens gone with their VMs; pushes when either changed.
    async fn housekeeping(&self) -> Result<(), Error> {
        let _w = self.write.lock().await;
        let changed = {
            let mut conn = self.db.conn();
            let tx = conn.transaction().map_err(db_err)?;
            let expired = collect_expired(&tx, now())?;
            let fp = tokens_fingerprint(&tx)?;
            let changed = expired > 0 || fp != *self.tokens_seen.lock().unwrap_or_else(|p| p.into_inner());
            if changed {
                bump_generation(&tx)?;
            }
            tx.commit().map_err(db_err)?;
            changed
        };
        if changed {
            self.publish()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_hosts() {
        assert_eq!(proxy_host("192.168.222.1/24").as_deref(), Some("192.168.222.1"));
        assert_eq!(proxy_host("fd00::1").as_deref(), Some("[fd00::1]"));
        assert_eq!(proxy_host("eth0"), None);
        let e = proxy_env("10.0.0.1", "spt_x");
        assert!(e.contains("HTTPS_PROXY=http://proxy:spt_x@10.0.0.1:3128\n"), "{e}");
        assert!(e.contains("no_proxy=localhost,127.0.0.1\n"));
        let t = new_token();
        assert!(t.starts_with("spt_") && t.len() == 68);
        assert!(check_literal_token(&t).is_ok());
        assert!(check_literal_token("short").is_err());
        assert!(check_literal_token("aaaaaaaaaaaaaaaa@evil").is_err());
    }
}
