//! Schema versions of `state.db`: `PRAGMA user_version` says which of [`MIGRATIONS`] ran.
//! Migration 1 is the schema of the release before versions (whose databases say 0); its
//! statements are `IF NOT EXISTS`, so such a database is adopted as version 1 unchanged.
//! New migrations are appended, never edited.

use rusqlite::Connection;

/// Why the state database cannot be opened at this code's schema.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the state database is at schema version {found}, newer than this slicer knows (up to {known}); \
         run the slicer release that wrote it"
    )]
    TooNew { found: u32, known: u32 },
    #[error("migrating the state database to schema version {version}: {source}")]
    Migrate {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error("reading the state database's schema version: {0}")]
    Version(#[source] rusqlite::Error),
}

/// The schema as of the first versioned release (everything `IF NOT EXISTS`).
const V1: &str = "
CREATE TABLE IF NOT EXISTS vms (
    hostname TEXT PRIMARY KEY,
    host_group TEXT NOT NULL,
    cpus INTEGER NOT NULL,
    ram_bytes INTEGER NOT NULL,
    persistent INTEGER NOT NULL,
    protected INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    ip TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    image TEXT NOT NULL,
    storage_size INTEGER,
    userdata TEXT,
    userdata_ran INTEGER NOT NULL DEFAULT 0,
    userdata_exit_code INTEGER,
    net_allow TEXT,
    net_drop TEXT,
    pid_start INTEGER
);
CREATE TABLE IF NOT EXISTS tags (
    hostname TEXT NOT NULL REFERENCES vms(hostname) ON DELETE CASCADE,
    pos INTEGER NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (hostname, pos)
);
CREATE TABLE IF NOT EXISTS secret_scopes (
    hostname TEXT PRIMARY KEY REFERENCES vms(hostname) ON DELETE CASCADE,
    names TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commits (
    commit_id TEXT PRIMARY KEY,
    source_hostname TEXT NOT NULL,
    source_host_group TEXT NOT NULL,
    created_at TEXT NOT NULL,
    cache_key TEXT,
    tags TEXT NOT NULL,
    labels TEXT NOT NULL,
    image TEXT NOT NULL,
    storage_size INTEGER,
    base_commit TEXT
);
CREATE INDEX IF NOT EXISTS commits_by_key ON commits(cache_key);
CREATE TABLE IF NOT EXISTS lineage (
    hostname TEXT PRIMARY KEY REFERENCES vms(hostname) ON DELETE CASCADE,
    commit_id TEXT,
    parent_commit_id TEXT
);
CREATE TABLE IF NOT EXISTS allocations (
    host_group TEXT PRIMARY KEY,
    next INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS proxy_clients (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS proxy_tokens (
    sha256 TEXT PRIMARY KEY,
    client TEXT NOT NULL REFERENCES proxy_clients(name) ON DELETE CASCADE,
    vm TEXT REFERENCES vms(hostname) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS proxy_secrets (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT
);
CREATE TABLE IF NOT EXISTS proxy_rules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL REFERENCES proxy_clients(name) ON DELETE CASCADE,
    rule TEXT NOT NULL,
    expires INTEGER
);
CREATE INDEX IF NOT EXISTS proxy_rules_by_client ON proxy_rules(client, id);
CREATE TABLE IF NOT EXISTS proxy_hellos (
    host_group TEXT PRIMARY KEY,
    bind TEXT NOT NULL,
    mode TEXT NOT NULL,
    pid INTEGER NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS proxy_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL REFERENCES proxy_clients(name) ON DELETE CASCADE,
    decision TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS proxy_decisions_by_client ON proxy_decisions(client, id);
CREATE TABLE IF NOT EXISTS proxy_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Ordered: `MIGRATIONS[i]` takes a database from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[V1];

/// The version this code writes.
pub const CURRENT: u32 = MIGRATIONS.len() as u32;

/// The database's `user_version`.
pub fn version(conn: &Connection) -> Result<u32, SchemaError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(SchemaError::Version)
}

/// Runs the migrations the database has not had, each in its own transaction with its
/// version; refuses a database newer than [`CURRENT`].
pub fn migrate(conn: &mut Connection) -> Result<u32, SchemaError> {
    let found = version(conn)?;
    if found > CURRENT {
        return Err(SchemaError::TooNew { found, known: CURRENT });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = i as u32 + 1;
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            // Immediate: a second daemon opening the file waits, then finds the step done.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if tx.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))? >= to {
                return Ok(());
            }
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()
        };
        step(conn).map_err(|source| SchemaError::Migrate { version: to, source })?;
    }
    Ok(CURRENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{ProxyAdmin, ProxyMetrics};
    use crate::state::Db;
    use slicer_api::VmStatus;

    /// A copy of the fixture written by the release before schema versions.
    fn fixture() -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("state.db");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/state-v0.db");
        std::fs::copy(src, &path).expect("copy the fixture");
        (d, path)
    }

    #[tokio::test]
    async fn a_database_of_the_release_before_versions_is_adopted_with_its_vms_commits_and_secrets() {
        let (d, path) = fixture();
        assert_eq!(version(&Connection::open(&path).expect("open")).expect("version"), 0);
        let db = Db::open(&path).expect("open at the current version");
        assert_eq!(version(&db.conn()).expect("version"), CURRENT);
        let vms = db.list().expect("list");
        let names: Vec<_> = vms.iter().map(|v| (v.hostname.as_str(), v.status)).collect();
        assert_eq!(names, [("sb-1", VmStatus::Stopped), ("sb-7", VmStatus::Running)]);
        assert_eq!(vms[0].tags, ["team=a", "env=dev"]);
        assert_eq!(vms[0].net_allow, Some(vec!["10.0.0.0/8".to_string()]));
        assert_eq!((vms[1].pid, vms[1].pid_start), (Some(4242), Some(123_456)));
        let commits = db.commits().expect("commits");
        assert_eq!(commits.len(), 1);
        assert_eq!(commits[0].commit_id, "c-0001");
        assert_eq!(commits[0].labels.get("owner").map(String::as_str), Some("ci"));
        assert_eq!(db.lineage("sb-1").expect("lineage"), (Some("c-0001".into()), None));
        assert_eq!(
            db.secret_scope("sb-1").expect("scope"),
            Some(vec!["api-key".to_string()])
        );
        drop(db);
        let metrics = ProxyMetrics::of(&crate::metrics::Metrics::new());
        let admin = ProxyAdmin::open(&path, d.path(), vec!["sb".into()], vec![], metrics).expect("proxy");
        let secrets = admin.secrets().expect("proxy secrets");
        assert_eq!(secrets.len(), 1);
        assert_eq!(
            (secrets[0].name.as_str(), secrets[0].host.as_str()),
            ("gh", "api.github.com")
        );
        assert_eq!(admin.clients().expect("clients")[0].name, "agent");
        assert_eq!(admin.client_rules("agent").expect("rules")[0].secret, "gh");
        admin.stop();
    }

    #[test]
    fn opening_twice_runs_each_migration_once() {
        let (_d, path) = fixture();
        drop(Db::open(&path).expect("first"));
        let db = Db::open(&path).expect("second");
        assert_eq!(version(&db.conn()).expect("version"), CURRENT);
        assert_eq!(db.list().expect("list").len(), 2);
    }

    #[test]
    fn a_database_newer_than_the_code_is_refused_naming_both_versions() {
        let (_d, path) = fixture();
        let conn = Connection::open(&path).expect("open");
        conn.pragma_update(None, "user_version", CURRENT + 3).expect("set");
        drop(conn);
        let err = slicer_error::chain_string(&Db::open(&path).err().expect("refused"));
        assert!(
            err.contains(&format!("schema version {}", CURRENT + 3)) && err.contains(&format!("up to {CURRENT}")),
            "{err}"
        );
    }

    /// Migration 1 is the old schema exactly: a new database has the fixture's tables.
    #[test]
    fn a_new_database_has_the_schema_of_the_release_before_versions() {
        let schema = |conn: &Connection| -> Vec<(String, String)> {
            let mut st = conn
                .prepare("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
                .expect("prepare");
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("query");
            rows.collect::<rusqlite::Result<_>>().expect("rows")
        };
        let (d, old) = fixture();
        let new = d.path().join("new.db");
        let db = Db::open(&new).expect("new");
        assert_eq!(schema(&db.conn()), schema(&Connection::open(&old).expect("old")));
    }
}
