//! Writes `tests/fixtures/state-v0.db`: a state database as the release before schema
//! versions wrote it (`user_version` 0), with VMs, tags, lineage, commits, a secret scope and
//! proxy clients, rules and secrets. The checked-in file was written by that release's code
//! (commit aca883f, `Db::open` with `CREATE TABLE IF NOT EXISTS` only). Run with
//! `SLICER_STATE_FIXTURE=$PWD/crates/slicer-daemon/tests/fixtures/state-v0.db cargo test -p slicer-daemon --lib write_state_fixture`
//! (without the variable the test checks that the writer still makes the fixture's rows).
//! While migration 1 is the only one, it is that release's schema exactly, so a database
//! written through today's code and set back to `user_version` 0 is the same database. Once a
//! migration 2 exists, keep this file as it is and add a fixture per version instead.

use std::collections::BTreeMap;
use std::path::Path;

use slicer_api::{AddProxyAllowRequest, CreateProxyClientRequest, CreateProxySecretRequest, VmStatus};

use crate::proxy::{ProxyAdmin, ProxyMetrics};
use crate::state::{CommitRecord, Db, VmRecord};

fn vm(group: &str, status: VmStatus, tags: &[&str]) -> VmRecord {
    VmRecord {
        hostname: String::new(),
        host_group: group.into(),
        cpus: 2,
        ram_bytes: 1 << 30,
        persistent: true,
        protected: false,
        status,
        created_at: "2026-12-01T10:00:00Z".into(),
        ip: "192.168.137.2".into(),
        pid: None,
        image: "min".into(),
        storage_size: Some(4 << 30),
        userdata: Some("echo hi".into()),
        userdata_ran: true,
        userdata_exit_code: Some(0),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        net_allow: Some(vec!["10.0.0.0/8".into()]),
        net_drop: None,
        pid_start: None,
    }
}

async fn write(path: &Path) {
    let db = Db::open(path).expect("open");
    let mut a = vm("sb", VmStatus::Stopped, &["team=a", "env=dev"]);
    db.create(&mut a, None).expect("vm a");
    let mut b = vm("sb", VmStatus::Running, &[]);
    b.pid = Some(4242);
    b.pid_start = Some(123_456);
    db.create(&mut b, Some(7)).expect("vm b");
    db.set_secret_scope(&a.hostname, &["api-key".into()]).expect("scope");
    db.add_commit(&CommitRecord {
        commit_id: "c-0001".into(),
        source_hostname: a.hostname.clone(),
        source_host_group: "sb".into(),
        created_at: "2026-12-01T11:00:00Z".into(),
        cache_key: Some("key-1".into()),
        tags: vec!["v1".into()],
        labels: BTreeMap::from([("owner".into(), "ci".into())]),
        image: "min".into(),
        storage_size: Some(4 << 30),
        base_commit: None,
    })
    .expect("commit");
    db.set_lineage(&a.hostname, Some("c-0001"), None).expect("lineage");
    drop(db);
    let data = path.parent().expect("a directory");
    let metrics = ProxyMetrics::of(&crate::metrics::Metrics::new());
    let admin = ProxyAdmin::open(path, data, vec!["sb".into()], vec![], metrics).expect("proxy");
    admin
        .create_client(CreateProxyClientRequest {
            name: "agent".into(),
            token: Some("fixture-token-0123456789".into()),
        })
        .await
        .expect("client");
    admin
        .create_secret(CreateProxySecretRequest {
            name: "gh".into(),
            host: "api.github.com".into(),
            kind: "bearer".into(),
            value: "ghp_fixture".into(),
            ..Default::default()
        })
        .await
        .expect("secret");
    admin
        .add_rule(AddProxyAllowRequest {
            client: "agent".into(),
            host: "api.github.com".into(),
            secret: "gh".into(),
            ..Default::default()
        })
        .await
        .expect("rule");
    admin.stop();
    drop(admin);
}

/// With `SLICER_STATE_FIXTURE` set, writes the fixture there. Without, checks that the
/// writer still makes what the checked-in fixture holds: the same tables with as many rows.
#[tokio::test]
async fn write_state_fixture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.db");
    write(&path).await;
    let conn = rusqlite::Connection::open(&path).expect("reopen");
    conn.execute_batch("PRAGMA user_version = 0;")
        .expect("back to version 0");
    drop(conn);
    match std::env::var_os("SLICER_STATE_FIXTURE") {
        Some(out) => {
            std::fs::copy(&path, out).expect("copy");
        }
        None => {
            // A copy: SQLite makes its -shm beside a WAL database even to read it.
            let checked_in = dir.path().join("checked-in.db");
            let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v0.db");
            std::fs::copy(fixture, &checked_in).expect("a copy of the fixture");
            assert_eq!(row_counts(&path), row_counts(&checked_in));
        }
    }
}

/// Each table of a database with its number of rows.
fn row_counts(db: &Path) -> BTreeMap<String, i64> {
    let conn = rusqlite::Connection::open(db).expect("open");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .expect("tables");
    tables
        .into_iter()
        .map(|t| {
            let n = conn
                .query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get(0))
                .expect("count");
            (t, n)
        })
        .collect()
}
