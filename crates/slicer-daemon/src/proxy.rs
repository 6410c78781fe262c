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
use crate::state::Db;

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

/// Makes the database file and its WAL companions 0600 if they are not (they hold secret
/// values). Symbolic links are left alone (SQLite itself opened the path).
fn secure_db_file(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.file_type().is_file() && m.mode() & 0o077 != 0 {
                if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                    tracing::warn!("making {} private (0600): {e}", p.display());
                }
            }
        }
    }
}

/// `dir` is a real directory (not a link) of ours that nobody else can write: what the root
/// daemon may create files in and connect to sockets of.
fn private_dir(dir: &Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_dir() && m.uid() == me && m.mode() & 0o022 == 0)
}

/// Writes the state to `<data dir>/proxy/state.json`: 0600, `O_NOFOLLOW`, whole or not at all.
pub fn write_state_file(data_dir: &Path, state: &ProxyState) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = control::proxy_dir(data_dir);
    if std::fs::symlink_metadata(&dir).is_err() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    anyhow::ensure!(
        private_dir(&dir),
        "{} is not a directory of the daemon's user that only it can write",
        dir.display()
    );
    let path = control::state_file(data_dir);
    let tmp = dir.join(".state.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let json = serde_json::to_vec(state)?;
    f.write_all(&json)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

/// A new client token: `spt_` and 32 random bytes in hex.
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

fn client_exists(tx: &rusqlite::Connection, name: &str) -> Result<bool, Error> {
    tx.query_row("SELECT 1 FROM proxy_clients WHERE name = ?1", params![name], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
        .map_err(db_err)
}

fn count(tx: &rusqlite::Connection, sql: &str, p: impl rusqlite::Params) -> Result<usize, Error> {
    tx.query_row(sql, p, |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as usize)
        .map_err(db_err)
}

/// A client's unexpired rules in order: (row id, rule).
fn rules_of(tx: &rusqlite::Connection, client: &str, now: i64) -> Result<Vec<(i64, ProxyAllowRule)>, Error> {
    let mut st = tx
        .prepare_cached(
            "SELECT id, rule FROM proxy_rules WHERE client = ?1 AND (expires IS NULL OR expires > ?2) ORDER BY id",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map(params![client, now], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, json) = row.map_err(db_err)?;
        match serde_json::from_str(&json) {
            Ok(w) => out.push((id, w)),
            Err(e) => tracing::warn!(client, "an unreadable proxy rule (id {id}) is skipped: {e}"),
        }
    }
    Ok(out)
}

fn generation(tx: &rusqlite::Connection) -> Result<u64, Error> {
    Ok(tx
        .query_row("SELECT value FROM proxy_meta WHERE key = 'generation'", [], |r| {
            r.get::<_, i64>(0)
        })
        .optional()
        .map_err(db_err)?
        .unwrap_or(0)
        .max(0) as u64)
}

fn bump_generation(tx: &rusqlite::Connection) -> Result<u64, Error> {
    let g = generation(tx)? + 1;
    tx.execute(
        "INSERT INTO proxy_meta (key, value) VALUES ('generation', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![g as i64],
    )
    .map_err(db_err)?;
    Ok(g)
}

/// Deletes expired rules; answers how many went.
fn collect_expired(tx: &rusqlite::Connection, now: i64) -> Result<usize, Error> {
    tx.execute(
        "DELETE FROM proxy_rules WHERE expires IS NOT NULL AND expires <= ?1",
        params![now],
    )
    .map_err(db_err)
}

fn tokens_fingerprint(tx: &rusqlite::Connection) -> Result<(i64, i64), Error> {
    tx.query_row("SELECT COUNT(*), COALESCE(SUM(rowid), 0) FROM proxy_tokens", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .map_err(db_err)
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
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(db_err)?
        {
            let (name, host, kind, value) = row.map_err(db_err)?;
            let kind = match kind.as_str() {
                "basic" => SecretKind::Basic,
                _ => SecretKind::Bearer,
            };
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
        write_state_file(&self.data_dir, &state).map_err(Error::host)?;
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

    // ----- clients -----

    pub fn clients(&self) -> Result<Vec<ProxyClient>, Error> {
        let conn = self.db.conn();
        let mut st = conn
            .prepare_cached("SELECT name, created_at FROM proxy_clients ORDER BY created_at, name")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(ProxyClient {
                    name: r.get(0)?,
                    created_at: r.get(1)?,
                })
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    pub async fn create_client(&self, req: CreateProxyClientRequest) -> Result<ProxyClientCreated, Error> {
        rules::check_name("name", &req.name).map_err(invalid)?;
        let token = match req.token {
            Some(t) => {
                check_literal_token(&t)?;
                t
            }
            None => new_token(),
        };
        let hash = rules::token_hash(&token);
        let created_at = crate::manager::stamp();
        let name = req.name.clone();
        let at = created_at.clone();
        self.change(move |tx| {
            if client_exists(tx, &name)? {
                return Err(Error::conflict(format!("name: proxy client {name:?} exists")));
            }
            if count(tx, "SELECT COUNT(*) FROM proxy_clients", [])? >= MAX_CLIENTS {
                return Err(Error::conflict(format!(
                    "at most {MAX_CLIENTS} proxy clients; delete some first"
                )));
            }
            if count(tx, "SELECT COUNT(*) FROM proxy_tokens WHERE sha256 = ?1", params![hash])? > 0 {
                return Err(Error::conflict("token: another proxy client has this token"));
            }
            tx.execute(
                "INSERT INTO proxy_clients (name, created_at) VALUES (?1, ?2)",
                params![name, at],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO proxy_tokens (sha256, client, vm) VALUES (?1, ?2, NULL)",
                params![hash, name],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await?;
        tracing::info!(client = req.name, "proxy client created");
        Ok(ProxyClientCreated {
            name: req.name,
            token,
            created_at,
        })
    }

    pub async fn delete_client(&self, name: &str) -> Result<(), Error> {
        rules::check_name("name", name).map_err(invalid)?;
        self.change(|tx| {
            let n = tx
                .execute("DELETE FROM proxy_clients WHERE name = ?1", params![name])
                .map_err(db_err)?;
            match n {
                0 => Err(Error::not_found(format!("proxy client {name:?} not found"))),
                _ => Ok(()),
            }
        })
        .await?;
        tracing::info!(client = name, "proxy client deleted");
        Ok(())
    }

    /// A client's unexpired rules in declaration order.
    pub fn client_rules(&self, name: &str) -> Result<Vec<ProxyAllowRule>, Error> {
        rules::check_name("name", name).map_err(|_| Error::not_found(format!("proxy client {name:?} not found")))?;
        let conn = self.db.conn();
        if !client_exists(&conn, name)? {
            return Err(Error::not_found(format!("proxy client {name:?} not found")));
        }
        Ok(rules_of(&conn, name, now())?.into_iter().map(|(_, r)| r).collect())
    }

    /// Mints a token of `client` for VM `vm` (removed with the VM); answers the token.
    pub async fn mint_vm_token(&self, client: &str, vm: &str) -> Result<String, Error> {
        let token = new_token();
        let hash = rules::token_hash(&token);
        self.change(|tx| {
            if !client_exists(tx, client)? {
                return Err(Error::invalid(format!("proxy.client: no proxy client {client:?}")));
            }
            if count(tx, "SELECT COUNT(*) FROM proxy_tokens WHERE client = ?1", params![client])? >= MAX_TOKENS_PER_CLIENT {
                return Err(Error::conflict(format!(
                    "proxy.client: {client:?} has {MAX_TOKENS_PER_CLIENT} tokens (one per proxy-bound VM); delete some VMs first"
                )));
            }
            tx.execute(
                "INSERT INTO proxy_tokens (sha256, client, vm) VALUES (?1, ?2, ?3)",
                params![hash, client, vm],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await?;
        Ok(token)
    }

    /// Checks a create's `proxy: {client}` for a VM of `group`: the client exists (else 400)
    /// and a proxy of the group said hello (else 409). Answers the host guests reach it at.
    pub fn check_binding(&self, group: &str, client: &str) -> Result<String, Error> {
        rules::check_name("proxy.client", client).map_err(invalid)?;
        let conn = self.db.conn();
        if !client_exists(&conn, client)? {
            return Err(Error::invalid(format!(
                "proxy.client: no proxy client {client:?} (create it with `slicer proxy client create {client}`)"
            )));
        }
        let bind: Option<String> = conn
            .query_row(
                "SELECT bind FROM proxy_hellos WHERE host_group = ?1",
                params![group],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        bind.as_deref().and_then(proxy_host).ok_or_else(|| {
            Error::conflict(format!(
                "proxy: no proxy has connected for host group {group}; run `slicer proxy up --hostgroup {group} --bind ADDR` first"
            ))
        })
    }

    // ----- secrets -----

    pub fn secrets(&self) -> Result<Vec<ProxySecret>, Error> {
        let conn = self.db.conn();
        let mut st = conn
            .prepare_cached("SELECT name, host, kind, created_at, updated_at FROM proxy_secrets ORDER BY name")
            .map_err(db_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(ProxySecret {
                    name: r.get(0)?,
                    host: r.get(1)?,
                    kind: r.get(2)?,
                    created_at: r.get(3)?,
                    updated_at: r.get(4)?,
                })
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    pub async fn create_secret(&self, req: CreateProxySecretRequest) -> Result<ProxySecret, Error> {
        rules::check_name("name", &req.name).map_err(invalid)?;
        HostPattern::parse(&req.host).map_err(invalid)?;
        let kind = secret_kind(&req.kind)?;
        let value = req.value;
        if value.is_empty() {
            return Err(Error::invalid("value: is empty"));
        }
        if value.len() > MAX_SECRET_VALUE {
            return Err(Error::invalid(format!("value: at most {MAX_SECRET_VALUE} bytes")));
        }
        // It becomes an HTTP header's value.
        if value.chars().any(char::is_control) {
            return Err(Error::invalid(
                "value: has a control character (a line break, say); it becomes an HTTP header",
            ));
        }
        if kind == SecretKind::Basic && !value.contains(':') {
            return Err(Error::invalid("value: a basic secret is user:password"));
        }
        let t = crate::manager::stamp();
        let (name, host, force) = (req.name.clone(), req.host.clone(), req.force);
        let out = self
            .change(move |tx| {
                let old: Option<(String, usize)> = tx
                    .query_row(
                        "SELECT created_at, length(CAST(value AS BLOB)) FROM proxy_secrets WHERE name = ?1",
                        params![name],
                        |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as usize)),
                    )
                    .optional()
                    .map_err(db_err)?;
                if old.is_some() && !force {
                    return Err(Error::conflict(format!(
                        "name: proxy secret {name:?} exists (pass force to replace it)"
                    )));
                }
                if old.is_none() && count(tx, "SELECT COUNT(*) FROM proxy_secrets", [])? >= MAX_SECRETS {
                    return Err(Error::conflict(format!(
                        "at most {MAX_SECRETS} proxy secrets; delete some first"
                    )));
                }
                let total = count(
                    tx,
                    "SELECT COALESCE(SUM(length(CAST(value AS BLOB))), 0) FROM proxy_secrets",
                    [],
                )?;
                if total - old.as_ref().map_or(0, |o| o.1) + value.len() > MAX_SECRET_BYTES {
                    return Err(Error::conflict(format!(
                        "proxy secrets may hold at most {MAX_SECRET_BYTES} bytes together; delete some first"
                    )));
                }
                let (created, updated) = match &old {
                    Some((c, _)) => (c.clone(), Some(t.clone())),
                    None => (t.clone(), None),
                };
                tx.execute(
                    "INSERT OR REPLACE INTO proxy_secrets (name, host, kind, value, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![name, host, kind.as_str(), value, created, updated],
                )
                .map_err(db_err)?;
                Ok(ProxySecret {
                    name: name.clone(),
                    host: host.clone(),
                    kind: kind.as_str().into(),
                    created_at: created,
                    updated_at: updated,
                })
            })
            .await?;
        tracing::info!(secret = out.name, host = out.host, "proxy secret stored");
        Ok(out)
    }

    pub async fn delete_secret(&self, name: &str) -> Result<(), Error> {
        rules::check_name("name", name).map_err(|_| Error::not_found(format!("proxy secret {name:?} not found")))?;
        self.change(|tx| {
            match tx
                .execute("DELETE FROM proxy_secrets WHERE name = ?1", params![name])
                .map_err(db_err)?
            {
                0 => Err(Error::not_found(format!("proxy secret {name:?} not found"))),
                _ => Ok(()),
            }
        })
        .await?;
        tracing::info!(secret = name, "proxy secret deleted");
        Ok(())
    }

    // ----- rules -----

    pub async fn add_rule(&self, req: AddProxyAllowRequest) -> Result<ProxyAllowRule, Error> {
        rules::check_name("client", &req.client).map_err(invalid)?;
        let rule = Rule::from_request(&req, now()).map_err(invalid)?;
        let client = req.client.clone();
        let out = self
            .change(move |tx| {
                if !client_exists(tx, &client)? {
                    return Err(Error::invalid(format!(
                        "client: no proxy client {client:?} (create it with `slicer proxy client create {client}`)"
                    )));
                }
                if let Some(s) = &rule.secret {
                    if count(tx, "SELECT COUNT(*) FROM proxy_secrets WHERE name = ?1", params![s])? == 0 {
                        return Err(Error::invalid(format!(
                            "secret: no proxy secret {s:?} (create it with `slicer proxy secret create {s} --host HOST`)"
                        )));
                    }
                }
                let existing = rules_of(tx, &client, now())?;
                if existing
                    .iter()
                    .filter_map(|(_, w)| Rule::from_wire(w).ok())
                    .any(|r| r.same_identity(&rule))
                {
                    return Err(Error::conflict(format!(
                        "client {client:?} already has this rule (same host, methods, paths, ports and passthrough); revoke it first"
                    )));
                }
                if existing.len() >= MAX_RULES_PER_CLIENT {
                    return Err(Error::conflict(format!(
                        "at most {MAX_RULES_PER_CLIENT} rules per client; revoke some first"
                    )));
                }
                if count(tx, "SELECT COUNT(*) FROM proxy_rules", [])? >= MAX_RULES {
                    return Err(Error::conflict(format!(
                        "at most {MAX_RULES} proxy rules in all; revoke some first"
                    )));
                }
                let json = serde_json::to_string(&rule.wire).map_err(Error::host)?;
                tx.execute(
                    "INSERT INTO proxy_rules (client, rule, expires) VALUES (?1, ?2, ?3)",
                    params![client, json, rule.expires],
                )
                .map_err(db_err)?;
                Ok(rule.wire.clone())
            })
            .await?;
        tracing::info!(client = req.client, host = out.host, "proxy rule added");
        Ok(out)
    }

    /// Removes every rule of `client` whose host is `host` as written.
    pub async fn remove_host(&self, client: &str, host: &str) -> Result<(), Error> {
        self.remove_where(client, |w| w.host == host, host).await
    }

    /// Removes the rule with the tuple's identity (and secret, when it names one).
    pub async fn revoke(&self, req: RemoveProxyAllowByTupleRequest) -> Result<(), Error> {
        rules::check_name("client", &req.client).map_err(invalid)?;
        let want = Rule::from_wire(&ProxyAllowRule {
            host: req.host.clone(),
            secret: req.secret.clone(),
            methods: req.methods.clone(),
            paths: req.paths.clone(),
            ports: req.ports.clone(),
            expires: None,
            passthrough: req.passthrough,
        })
        .map_err(invalid)?;
        self.remove_where(
            &req.client,
            |w| {
                Rule::from_wire(w)
                    .is_ok_and(|r| r.same_identity(&want) && (req.secret.is_empty() || r.wire.secret == req.secret))
            },
            &req.host,
        )
        .await
    }

    async fn remove_where(
        &self,
        client: &str,
        pick: impl Fn(&ProxyAllowRule) -> bool,
        host: &str,
    ) -> Result<(), Error> {
        rules::check_name("client", client)
            .map_err(|_| Error::not_found(format!("proxy client {client:?} not found")))?;
        self.change(|tx| {
            if !client_exists(tx, client)? {
                return Err(Error::not_found(format!("proxy client {client:?} not found")));
            }
            let mut n = 0;
            for (id, w) in rules_of(tx, client, now())? {
                if pick(&w) {
                    n += tx
                        .execute("DELETE FROM proxy_rules WHERE id = ?1", params![id])
                        .map_err(db_err)?;
                }
            }
            match n {
                0 => Err(Error::not_found(format!(
                    "proxy client {client:?} has no such rule for host {host:?}"
                ))),
                _ => Ok(()),
            }
        })
        .await?;
        tracing::info!(client, host, "proxy rules revoked");
        Ok(())
    }

    // ----- decisions -----

    /// Keeps decisions (of known clients), the last [`DECISIONS_PER_CLIENT`] of each and
    /// [`DECISIONS_TOTAL`] in all.
    fn store_decisions(&self, batch: Vec<Decision>) -> Result<(), Error> {
        let mut conn = self.db.conn();
        let tx = conn.transaction().map_err(db_err)?;
        let mut clients: Vec<String> = Vec::new();
        for d in &batch {
            let json = serde_json::to_string(d).map_err(Error::host)?;
            tx.execute(
                "INSERT INTO proxy_decisions (client, decision)
                 SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM proxy_clients WHERE name = ?1)",
                params![d.client, json],
            )
            .map_err(db_err)?;
            if !clients.contains(&d.client) {
                clients.push(d.client.clone());
            }
        }
        for c in &clients {
            tx.execute(
                "DELETE FROM proxy_decisions WHERE client = ?1 AND id <= (
                    SELECT id FROM proxy_decisions WHERE client = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![c, DECISIONS_PER_CLIENT as i64],
            )
            .map_err(db_err)?;
        }
        tx.execute(
            "DELETE FROM proxy_decisions WHERE id <= (
                SELECT id FROM proxy_decisions ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            params![DECISIONS_TOTAL as i64],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// The decisions kept for `client`, oldest first.
    pub fn decisions(&self, client: &str) -> Result<Vec<Decision>, Error> {
        let conn = self.db.conn();
        let mut st = conn
            .prepare_cached("SELECT decision FROM proxy_decisions WHERE client = ?1 ORDER BY id")
            .map_err(db_err)?;
        let rows = st
            .query_map(params![client], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(d) = serde_json::from_str(&r.map_err(db_err)?) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Rules that would allow what `client` was denied and its rules still deny.
    pub fn suggest(&self, client: &str) -> Result<Vec<AddProxyAllowRequest>, Error> {
        let rules = self.client_rules(client)?;
        let state = {
            let conn = self.db.conn();
            self.build_state(&conn)?
        };
        let policy = Policy::compile(&ProxyState {
            secrets: state.secrets,
            ..ProxyState::default()
        });
        let cp = ClientPolicy {
            name: client.to_string(),
            rules: rules.iter().filter_map(|w| Rule::from_wire(w).ok()).collect(),
        };
        let t = now();
        let still_denied: Vec<Decision> = self
            .decisions(client)?
            .into_iter()
            .filter(|d| !d.allow)
            .filter(|d| {
                let host = rules::normalize_host(&d.host).unwrap_or_default();
                match (d.scheme.as_str(), d.method.as_str()) {
                    ("tcp", _) => !matches!(policy.connect(&cp, &host, d.port, t), ConnectDecision::Passthrough(_)),
                    (_, "CONNECT") => matches!(policy.connect(&cp, &host, d.port, t), ConnectDecision::Deny(_)),
                    _ => !matches!(
                        policy.request(&cp, &host, d.port, &d.method, &d.path, t),
                        RequestDecision::Allow { .. }
                    ),
                }
            })
            .collect();
        Ok(slicer_proxy::suggest::suggest(&still_denied))
    }

    // ----- links to proxies -----

    /// Connects to the socket of each configured group's proxy not linked yet.
    fn scan(self: &Arc<Self>) {
        let dir = control::proxy_dir(&self.data_dir);
        if !private_dir(&dir) {
            return;
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        for group in &self.groups {
            if self.links().contains_key(group) {
                continue;
            }
            let path = control::control_socket(&self.data_dir, group);
            let ok = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket() && m.uid() == me);
            if !ok {
                continue;
            }
            let id = self.next_link.fetch_add(1, Ordering::Relaxed);
            let (acked_tx, acked) = watch::channel(0u64);
            let hello = Arc::new(AtomicBool::new(false));
            self.links().insert(
                group.clone(),
                Link {
                    id,
                    acked,
                    hello: hello.clone(),
                },
            );
            let (me2, group) = (self.clone(), group.clone());
            let closing = self.closing.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = me2.link(&group, &path, acked_tx, &hello) => {
                        if let Err(e) = r {
                            tracing::info!(group, "proxy control link ended: {e:#}");
                        }
                    }
                    _ = closing.cancelled() => {}
                }
                let mut links = me2.links();
                if links.get(&group).is_some_and(|l| l.id == id) {
                    links.remove(&group);
                }
                if hello.load(Ordering::SeqCst) {
                    me2.metrics.connected.dec();
                }
                me2.metrics
                    .open
                    .get_or_create(&GroupLabels { group: group.clone() })
                    .set(0);
            });
        }
    }

    async fn link(
        &self,
        group: &str,
        path: &Path,
        acked: watch::Sender<u64>,
        hello: &AtomicBool,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let stream = tokio::time::timeout(CONNECT_WAIT, tokio::net::UnixStream::connect(path))
            .await
            .context("connecting timed out")?
            .with_context(|| format!("connecting to {}", path.display()))?;
        let (rd, mut wr) = stream.into_split();
        let mut lines = Lines {
            rd,
            buf: slicer_agent_proto::lines::LineBuf::new(),
        };
        let first = tokio::time::timeout(HELLO_WAIT, lines.next())
            .await
            .context("no hello within 5 s")??;
        match serde_json::from_slice::<FromProxy>(&first).context("reading the hello")? {
            FromProxy::Hello {
                group: g,
                bind,
                mode,
                pid,
            } => {
                anyhow::ensure!(g == group, "the proxy on {group}'s socket says it serves {g:?}");
                anyhow::ensure!(
                    proxy_host(&bind).is_some(),
                    "the proxy's bind {bind:?} is not an IP address"
                );
                self.db
                    .conn()
                    .execute(
                        "INSERT OR REPLACE INTO proxy_hellos (host_group, bind, mode, pid, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![group, bind, mode.as_str(), pid, now()],
                    )
                    .context("recording the proxy's hello")?;
                tracing::info!(group, bind, mode = mode.as_str(), pid, "proxy connected");
            }
            _ => anyhow::bail!("the proxy's first line is not a hello"),
        }
        hello.store(true, Ordering::SeqCst);
        self.metrics.connected.inc();
        let mut state = self.state.subscribe();
        let first_state = state.borrow_and_update().clone();
        send_state(&mut wr, &first_state).await?;
        let mut pending: Vec<Decision> = Vec::new();
        let mut flush = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                changed = state.changed() => {
                    changed.context("the daemon is stopping")?;
                    let s = state.borrow_and_update().clone();
                    send_state(&mut wr, &s).await?;
                }
                line = lines.next() => {
                    let line = line?;
                    match serde_json::from_slice::<FromProxy>(&line) {
                        Ok(FromProxy::Ack { generation }) => {
                            acked.send_if_modified(|a| {
                                let newer = generation > *a;
                                if newer {
                                    *a = generation;
                                }
                                newer
                            });
                        }
                        Ok(FromProxy::Decision(d)) => {
                            let decision = if d.allow { "allow" } else { "deny" };
                            self.metrics
                                .decisions
                                .get_or_create(&ProxyDecisionLabels { group: group.into(), decision: decision.into() })
                                .inc();
                            if keep_for_suggest(&d) {
                                pending.push(d);
                            }
                            if pending.len() >= DECISION_BATCH {
                                self.flush_decisions(&mut pending);
                            }
                        }
                        Ok(FromProxy::Stats(s)) => {
                            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                            for (dir, v) in [("up", s.bytes_up), ("down", s.bytes_down)] {
                                self.metrics
                                    .bytes
                                    .get_or_create(&ProxyBytesLabels { group: group.into(), direction: dir.into() })
                                    .set(clamp(v));
                            }
                            self.metrics
                                .open
                                .get_or_create(&GroupLabels { group: group.into() })
                                .set(clamp(s.open_connections));
                        }
                        Ok(FromProxy::Hello { .. }) => {}
                        Err(e) => tracing::debug!(group, "an unreadable line from the proxy: {e}"),
                    }
                }
                _ = flush.tick() => self.flush_decisions(&mut pending),
            }
        }
    }

    fn flush_decisions(&self, pending: &mut Vec<Decision>) {
        if pending.is_empty() {
            return;
        }
        if let Err(e) = self.store_decisions(std::mem::take(pending)) {
            tracing::warn!("keeping proxy decisions: {e}");
        }
    }
}

/// Whether a decision is kept for `suggest`: a denial of a named client, every field within
/// the bounds a rule has (so the kept decisions stay small: a few KiB each at most).
fn keep_for_suggest(d: &Decision) -> bool {
    !d.allow
        && rules::check_name("client", &d.client).is_ok()
        && d.host.len() <= rules::MAX_HOST_LEN
        && d.path.len() <= rules::MAX_PATH_LEN
        && d.method.len() <= 32
        && d.scheme.len() <= 16
        && d.reason.len() <= 64
        && d.secret.len() <= rules::MAX_NAME_LEN
}

async fn send_state(wr: &mut tokio::net::unix::OwnedWriteHalf, state: &ProxyState) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(&ToProxy::State { state: state.clone() })?;
    line.push(b'\n');
    tokio::time::timeout(SEND_WAIT, wr.write_all(&line))
        .await
        .map_err(|_| anyhow::anyhow!("the proxy did not read the state within {SEND_WAIT:?}"))??;
    Ok(())
}

/// Lines from a proxy, each at most [`control::MAX_EVENT_LINE`]. `next` is cancel-safe (what
/// was read stays in `buf`).
struct Lines {
    rd: tokio::net::unix::OwnedReadHalf,
    buf: slicer_agent_proto::lines::LineBuf,
}

impl Lines {
    async fn next(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(l) = self.buf.next_line() {
                anyhow::ensure!(
                    l.len() <= control::MAX_EVENT_LINE + 1,
                    "a line from the proxy is longer than {} bytes",
                    control::MAX_EVENT_LINE
                );
                return Ok(l.to_vec());
            }
            anyhow::ensure!(
                self.buf.pending() <= control::MAX_EVENT_LINE,
                "a line from the proxy is longer than {} bytes",
                control::MAX_EVENT_LINE
            );
            let n = self.rd.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "the proxy closed the connection");
            self.buf.push(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_proxy_line_past_the_bound_ends_the_link() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (rd, w) = a.into_split();
        let mut lines = Lines {
            rd,
            buf: slicer_agent_proto::lines::LineBuf::new(),
        };
        let (_r, mut wr) = b.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(b"{\"type\":\"ack\",\"generation\":1}\n").await.unwrap();
            // Endless bytes without a newline.
            let junk = vec![b'x'; 1 << 16];
            while wr.write_all(&junk).await.is_ok() {}
        });
        assert_eq!(lines.next().await.unwrap(), b"{\"type\":\"ack\",\"generation\":1}\n");
        let e = lines.next().await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        // Closing our end ends the writer.
        drop(lines);
        drop(w);
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap();
    }

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
