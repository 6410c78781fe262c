//! Daemon state in SQLite: VMs, their tags, and hostname allocation. Every change is one
//! transaction, so a crash leaves either the old or the new state.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use slicer_api::VmStatus;

pub mod column;
pub mod migrations;

/// What a state database operation can fail with. SQLite's own error stays the source, so
/// a caller finds `SQLITE_FULL` or `SQLITE_BUSY` by type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed or refused.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The same, with what was being done.
    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    /// A JSON column (tags, labels, names) could not be written.
    #[error("encoding a JSON column")]
    Json(#[from] serde_json::Error),
    /// The database's schema is one this build cannot use.
    #[error("{context}")]
    Schema {
        context: String,
        #[source]
        source: migrations::SchemaError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// What was being done, put above a SQLite or schema error (the state database's `context`).
trait Context<T> {
    fn context(self, context: &str) -> Result<T>;
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for rusqlite::Result<T> {
    fn context(self, context: &str) -> Result<T> {
        self.with_context(|| context.to_string())
    }
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sql {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, migrations::SchemaError> {
    fn context(self, context: &str) -> Result<T> {
        self.with_context(|| context.to_string())
    }
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Schema {
            context: context(),
            source,
        })
    }
}

use column::Text;

#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub hostname: String,
    pub host_group: String,
    pub cpus: u32,
    pub ram_bytes: u64,
    pub persistent: bool,
    /// Created from the config's `count`: DELETE answers 403.
    pub protected: bool,
    pub status: VmStatus,
    pub created_at: String,
    pub ip: String,
    pub pid: Option<u32>,
    pub image: String,
    pub storage_size: Option<u64>,
    pub userdata: Option<String>,
    pub userdata_ran: bool,
    pub userdata_exit_code: Option<i32>,
    pub tags: Vec<String>,
    /// Per-VM network policy overrides (`None`: inherit the host group's list).
    pub net_allow: Option<Vec<String>>,
    pub net_drop: Option<Vec<String>>,
    /// Start time of `pid` (clock ticks since boot), to recognise the process after a restart.
    pub pid_start: Option<u64>,
}

pub struct Db {
    conn: Mutex<Connection>,
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRecord> {
    Ok(VmRecord {
        hostname: r.get(0)?,
        host_group: r.get(1)?,
        cpus: r.get(2)?,
        ram_bytes: r.get::<_, i64>(3)? as u64,
        persistent: r.get(4)?,
        protected: r.get(5)?,
        status: r.get::<_, Text<VmStatus>>(6)?.0,
        created_at: r.get(7)?,
        ip: r.get(8)?,
        pid: r.get(9)?,
        image: r.get(10)?,
        storage_size: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        userdata: r.get(12)?,
        userdata_ran: r.get(13)?,
        userdata_exit_code: r.get(14)?,
        tags: Vec::new(),
        net_allow: r
            .get::<_, Option<String>>(15)?
            .and_then(|j| serde_json::from_str(&j).ok()),
        net_drop: r
            .get::<_, Option<String>>(16)?
            .and_then(|j| serde_json::from_str(&j).ok()),
        pid_start: r.get::<_, Option<i64>>(17)?.map(|v| v as u64),
    })
}

const COLUMNS: &str = "hostname, host_group, cpus, ram_bytes, persistent, protected, status, created_at, ip, pid, \
                       image, storage_size, userdata, userdata_ran, userdata_exit_code, net_allow, net_drop, pid_start";

/// A commit: a stopped VM's disk, frozen, for forks to start from.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitRecord {
    pub commit_id: String,
    pub source_hostname: String,
    pub source_host_group: String,
    pub created_at: String,
    pub cache_key: Option<String>,
    pub tags: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub image: String,
    pub storage_size: Option<u64>,
    /// The commit whose disk this one's sits on (a commit of a fork, or a second commit).
    pub base_commit: Option<String>,
}

const COMMIT_COLUMNS: &str =
    "commit_id, source_hostname, source_host_group, created_at, cache_key, tags, labels, image, storage_size, base_commit";

fn row_to_commit(r: &rusqlite::Row<'_>) -> rusqlite::Result<CommitRecord> {
    Ok(CommitRecord {
        commit_id: r.get(0)?,
        source_hostname: r.get(1)?,
        source_host_group: r.get(2)?,
        created_at: r.get(3)?,
        cache_key: r.get(4)?,
        tags: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
        labels: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
        image: r.get(7)?,
        storage_size: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        base_commit: r.get(9)?,
    })
}

impl Db {
    pub fn add_commit(&self, c: &CommitRecord) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            &format!("INSERT INTO commits ({COMMIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
            params![
                c.commit_id,
                c.source_hostname,
                c.source_host_group,
                c.created_at,
                c.cache_key,
                serde_json::to_string(&c.tags)?,
                serde_json::to_string(&c.labels)?,
                c.image,
                c.storage_size.map(|v| v as i64),
                c.base_commit
            ],
        )?;
        Ok(())
    }

    pub fn commit(&self, id: &str) -> Result<Option<CommitRecord>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {COMMIT_COLUMNS} FROM commits WHERE commit_id = ?1"),
                params![id],
                row_to_commit,
            )
            .optional()?)
    }

    pub fn commits(&self) -> Result<Vec<CommitRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!(
            "SELECT {COMMIT_COLUMNS} FROM commits ORDER BY created_at, commit_id"
        ))?;
        let rows = st.query_map([], row_to_commit)?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn delete_commit(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM commits WHERE commit_id = ?1", params![id])?
            > 0)
    }

    /// (last commit made of the VM, commit it was forked from).
    pub fn lineage(&self, hostname: &str) -> Result<(Option<String>, Option<String>)> {
        Ok(self
            .conn()
            .query_row(
                "SELECT commit_id, parent_commit_id FROM lineage WHERE hostname = ?1",
                params![hostname],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((None, None)))
    }

    pub fn set_lineage(&self, hostname: &str, commit: Option<&str>, parent: Option<&str>) -> Result<()> {
        self.conn().execute(
            "INSERT INTO lineage (hostname, commit_id, parent_commit_id) VALUES (?1, ?2, ?3)
             ON CONFLICT(hostname) DO UPDATE SET commit_id = excluded.commit_id, parent_commit_id = excluded.parent_commit_id",
            params![hostname, commit, parent],
        )?;
        Ok(())
    }

    /// VMs whose disk sits on commit `id` (its source after the commit, and its forks).
    pub fn commit_dependents(&self, id: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT hostname FROM lineage WHERE commit_id = ?1 OR parent_commit_id = ?1
             UNION SELECT 'commit ' || commit_id FROM commits WHERE base_commit = ?1 ORDER BY 1",
        )?;
        let rows = st
            .query_map(params![id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn open(path: &Path) -> Result<Db> {
        let mut conn = Connection::open(path).with_context(|| format!("opening state database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON;")
            .context("setting up the state database")?;
        migrations::migrate(&mut conn).with_context(|| format!("opening state database {}", path.display()))?;
        Ok(Db { conn: Mutex::new(conn) })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates the next hostname number of a group and inserts the VM, atomically.
    /// Numbers are never reused, so a stale hostname never reaches a newer VM.
    pub fn create(&self, rec: &mut VmRecord, fixed_number: Option<u32>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n: u32 = match fixed_number {
            Some(n) => {
                // Keep API allocations above the fixed numbers of count VMs.
                tx.execute(
                    "INSERT INTO allocations (host_group, next) VALUES (?1, ?2)
                     ON CONFLICT(host_group) DO UPDATE SET next = max(next, excluded.next)",
                    params![rec.host_group, n + 1],
                )?;
                n
            }
            None => {
                let next: Option<u32> = tx
                    .query_row(
                        "SELECT next FROM allocations WHERE host_group = ?1",
                        params![rec.host_group],
                        |r| r.get(0),
                    )
                    .optional()?;
                let n = next.unwrap_or(1);
                tx.execute(
                    "INSERT INTO allocations (host_group, next) VALUES (?1, ?2)
                     ON CONFLICT(host_group) DO UPDATE SET next = excluded.next",
                    params![rec.host_group, n + 1],
                )?;
                n
            }
        };
        rec.hostname = format!("{}-{n}", rec.host_group);
        tx.execute(
            &format!(
                "INSERT INTO vms ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
            ),
            params![
                rec.hostname,
                rec.host_group,
                rec.cpus,
                rec.ram_bytes as i64,
                rec.persistent,
                rec.protected,
                Text(rec.status),
                rec.created_at,
                rec.ip,
                rec.pid,
                rec.image,
                rec.storage_size.map(|v| v as i64),
                rec.userdata,
                rec.userdata_ran,
                rec.userdata_exit_code,
                rec.net_allow.as_ref().map(|v| serde_json::to_string(v).unwrap_or_default()),
                rec.net_drop.as_ref().map(|v| serde_json::to_string(v).unwrap_or_default()),
                rec.pid_start.map(|v| v as i64)
            ],
        )
        .with_context(|| format!("recording VM {}", rec.hostname))?;
        for (i, t) in rec.tags.iter().enumerate() {
            tx.execute(
                "INSERT INTO tags (hostname, pos, tag) VALUES (?1, ?2, ?3)",
                params![rec.hostname, i as i64, t],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn load_tags(conn: &Connection, rec: &mut VmRecord) -> Result<()> {
        let mut st = conn.prepare_cached("SELECT tag FROM tags WHERE hostname = ?1 ORDER BY pos")?;
        rec.tags = st
            .query_map(params![rec.hostname], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(())
    }

    pub fn get(&self, hostname: &str) -> Result<Option<VmRecord>> {
        let conn = self.conn();
        let rec = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM vms WHERE hostname = ?1"),
                params![hostname],
                row_to_record,
            )
            .optional()?;
        match rec {
            Some(mut r) => {
                Db::load_tags(&conn, &mut r)?;
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    pub fn list(&self) -> Result<Vec<VmRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM vms ORDER BY host_group, created_at, hostname"
        ))?;
        let mut recs: Vec<VmRecord> = st.query_map([], row_to_record)?.collect::<rusqlite::Result<_>>()?;
        let mut tags = conn.prepare_cached("SELECT hostname, tag FROM tags ORDER BY hostname, pos")?;
        let mut by_host: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        for row in tags.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (h, t) = row?;
            by_host.entry(h).or_default().push(t);
        }
        for r in &mut recs {
            r.tags = by_host.remove(&r.hostname).unwrap_or_default();
        }
        Ok(recs)
    }

    /// Status and, while it runs, the VM process (pid and start time).
    pub fn set_status(&self, hostname: &str, status: VmStatus, process: Option<(u32, u64)>) -> Result<()> {
        self.conn().execute(
            "UPDATE vms SET status = ?2, pid = ?3, pid_start = ?4 WHERE hostname = ?1",
            params![
                hostname,
                Text(status),
                process.map(|p| p.0),
                process.map(|p| p.1 as i64)
            ],
        )?;
        Ok(())
    }

    pub fn set_userdata_result(&self, hostname: &str, code: i32) -> Result<()> {
        self.conn().execute(
            "UPDATE vms SET userdata_ran = 1, userdata_exit_code = ?2 WHERE hostname = ?1",
            params![hostname, code],
        )?;
        Ok(())
    }

    pub fn set_tags(&self, hostname: &str, tags: &[String]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM tags WHERE hostname = ?1", params![hostname])?;
        for (i, t) in tags.iter().enumerate() {
            tx.execute(
                "INSERT INTO tags (hostname, pos, tag) VALUES (?1, ?2, ?3)",
                params![hostname, i as i64, t],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Limits the secrets synced into a VM to `names` (its create request's `secrets`).
    pub fn set_secret_scope(&self, hostname: &str, names: &[String]) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO secret_scopes (hostname, names) VALUES (?1, ?2)",
            params![hostname, serde_json::to_string(names)?],
        )?;
        Ok(())
    }

    /// The secrets a VM may have (`None`: all).
    pub fn secret_scope(&self, hostname: &str) -> Result<Option<Vec<String>>> {
        let raw: Option<String> = self
            .conn()
            .query_row(
                "SELECT names FROM secret_scopes WHERE hostname = ?1",
                params![hostname],
                |r| r.get(0),
            )
            .optional()?;
        Ok(raw.and_then(|j| serde_json::from_str(&j).ok()))
    }

    pub fn delete(&self, hostname: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM vms WHERE hostname = ?1", params![hostname])?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod fixture;

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(group: &str) -> VmRecord {
        VmRecord {
            hostname: String::new(),
            host_group: group.into(),
            cpus: 1,
            ram_bytes: 1 << 30,
            persistent: false,
            protected: false,
            status: VmStatus::Running,
            created_at: "2026-01-01T00:00:00Z".into(),
            ip: String::new(),
            pid: Some(5),
            image: "min".into(),
            storage_size: None,
            userdata: None,
            userdata_ran: false,
            userdata_exit_code: None,
            tags: vec!["b=2".into(), "a=1".into()],
            net_allow: None,
            net_drop: Some(vec![]),
            pid_start: None,
        }
    }

    #[test]
    fn hostnames_are_allocated_per_group_and_never_reused() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        let mut a = rec("sb");
        db.create(&mut a, None).unwrap();
        let mut b = rec("sb");
        db.create(&mut b, None).unwrap();
        let mut c = rec("other");
        db.create(&mut c, None).unwrap();
        assert_eq!(
            (a.hostname.as_str(), b.hostname.as_str(), c.hostname.as_str()),
            ("sb-1", "sb-2", "other-1")
        );
        assert!(db.delete("sb-2").unwrap());
        let mut d2 = rec("sb");
        db.create(&mut d2, None).unwrap();
        assert_eq!(d2.hostname, "sb-3");
        let got = db.get("sb-1").unwrap().unwrap();
        assert_eq!(got.tags, vec!["b=2", "a=1"], "tag order is kept");
        assert_eq!(
            (got.net_allow, got.net_drop),
            (None, Some(vec![])),
            "absent and empty overrides differ"
        );
        db.set_tags("sb-1", &["x".into()]).unwrap();
        assert_eq!(
            db.list().unwrap().iter().find(|r| r.hostname == "sb-1").unwrap().tags,
            vec!["x"]
        );
        assert!(db.get("sb-2").unwrap().is_none());
    }
}
