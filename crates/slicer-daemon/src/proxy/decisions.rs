//! Decisions proxies report: kept (bounded) per client, and turned into `suggest` answers.

use super::*;

impl ProxyAdmin {
    // ----- decisions -----

    /// Keeps decisions (of known clients), the last [`DECISIONS_PER_CLIENT`] of each and
    /// [`DECISIONS_TOTAL`] in all.
    pub(super) fn store_decisions(&self, batch: Vec<Decision>) -> Result<(), Error> {
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
}

/// Whether a decision is kept for `suggest`: a denial of a named client, every field within
/// the bounds a rule has (so the kept decisions stay small: a few KiB each at most).
pub(super) fn keep_for_suggest(d: &Decision) -> bool {
    !d.allow
        && rules::check_name("client", &d.client).is_ok()
        && d.host.len() <= rules::MAX_HOST_LEN
        && d.path.len() <= rules::MAX_PATH_LEN
        && d.method.len() <= 32
        && d.scheme.len() <= 16
        && d.reason.len() <= 64
        && d.secret.len() <= rules::MAX_NAME_LEN
}
