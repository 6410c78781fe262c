//! The admin operations: clients, their tokens, upstream secrets and rules.

use super::*;

impl ProxyAdmin {
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
                    params![name, host, Text(kind), value, created, updated],
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

    pub(super) async fn remove_where(
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
}
