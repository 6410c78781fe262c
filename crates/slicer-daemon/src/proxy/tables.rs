//! The proxy tables in `state.db`: lookups and bookkeeping shared by the admin changes.

use super::*;

pub(super) fn client_exists(tx: &rusqlite::Connection, name: &str) -> Result<bool, Error> {
    tx.query_row("SELECT 1 FROM proxy_clients WHERE name = ?1", params![name], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
        .map_err(db_err)
}

pub(super) fn count(tx: &rusqlite::Connection, sql: &str, p: impl rusqlite::Params) -> Result<usize, Error> {
    tx.query_row(sql, p, |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as usize)
        .map_err(db_err)
}

/// A client's unexpired rules in order: (row id, rule).
pub(super) fn rules_of(tx: &rusqlite::Connection, client: &str, now: i64) -> Result<Vec<(i64, ProxyAllowRule)>, Error> {
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

pub(super) fn generation(tx: &rusqlite::Connection) -> Result<u64, Error> {
    Ok(tx
        .query_row("SELECT value FROM proxy_meta WHERE key = 'generation'", [], |r| {
            r.get::<_, i64>(0)
        })
        .optional()
        .map_err(db_err)?
        .unwrap_or(0)
        .max(0) as u64)
}

pub(super) fn bump_generation(tx: &rusqlite::Connection) -> Result<u64, Error> {
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
pub(super) fn collect_expired(tx: &rusqlite::Connection, now: i64) -> Result<usize, Error> {
    tx.execute(
        "DELETE FROM proxy_rules WHERE expires IS NOT NULL AND expires <= ?1",
        params![now],
    )
    .map_err(db_err)
}

pub(super) fn tokens_fingerprint(tx: &rusqlite::Connection) -> Result<(i64, i64), Error> {
    tx.query_row("SELECT COUNT(*), COALESCE(SUM(rowid), 0) FROM proxy_tokens", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .map_err(db_err)
}
