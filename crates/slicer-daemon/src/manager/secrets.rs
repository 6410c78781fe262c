//! Secrets in guests: what a VM may have (its scope), copying them in at boot and after a
//! change, one push at a time per VM, each bounded.

use super::*;
use crate::secrets::SecretInfo;

/// Waits up to `max` for secret pushes started by [`Manager::spread_secret`]; they go on
/// afterwards.
pub async fn settle_pushes(pushes: Vec<tokio::task::JoinHandle<()>>, max: Duration) {
    let _ = tokio::time::timeout(max, futures_util::future::join_all(pushes)).await;
}

impl Manager {
    /// Whether `hostname` may have secret `name`.
    pub(super) fn secret_allowed(&self, hostname: &str, name: &str) -> bool {
        match self.db.secret_scope(hostname) {
            Ok(Some(names)) => names.iter().any(|n| n == name),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Copies one secret into a guest (mode and owner as stored).
    pub(super) async fn push_secret(
        vm: &dyn Machine,
        info: &crate::secrets::SecretInfo,
        value: Vec<u8>,
    ) -> Result<(), SecretSyncError> {
        let guest = vm.guest();
        // A recursive mkdir of an existing directory succeeds.
        guest
            .mkdir(&slicer_agent_proto::MkdirRequest {
                path: crate::secrets::GUEST_DIR.into(),
                recursive: true,
                mode: Some("0711".into()),
            })
            .await?;
        let up = guest::Upload {
            tar: false,
            path: format!("{}/{}", crate::secrets::GUEST_DIR, info.name),
            placed: None,
            mode: Some(info.mode()),
            owner: Some((info.uid, Some(info.gid))),
        };
        guest.upload(&up, Box::pin(std::io::Cursor::new(value))).await?;
        Ok(())
    }

    /// Makes the guest's copy of secret `name` what the store holds now: its value, or none
    /// when the secret is gone or the VM may not have it.
    pub(super) async fn apply_secret(
        &self,
        hostname: &str,
        vm: &dyn Machine,
        name: &str,
    ) -> Result<(), SecretSyncError> {
        let info = match self.secret_allowed(hostname, name) {
            true => self.secrets.info(name).map_err(SecretSyncError::Store)?,
            false => None,
        };
        match info {
            Some(info) => {
                let value = self.secrets.value(name).map_err(SecretSyncError::Store)?;
                Self::push_secret(vm, &info, value).await
            }
            None => vm
                .guest()
                .remove(&format!("{}/{name}", crate::secrets::GUEST_DIR), false)
                .await
                .or_else(|e| if e.is_not_found() { Ok(()) } else { Err(e) })
                .map_err(SecretSyncError::from),
        }
    }

    /// Makes a guest's secrets match the store: every secret it may have, current; with
    /// `prune`, also none it should no longer have (after a pause or a suspend; a live fork
    /// restored with its source's memory). Runs in the
    /// VM's secret queue, each step bounded by [`SECRET_PUSH_TIMEOUT`].
    pub(super) async fn sync_secrets(&self, hostname: &str, r: &Running, prune: bool) -> Result<(), SecretSyncError> {
        let _turn = r.secrets_turn.lock().await;
        let mut names: Vec<String> = self
            .secrets
            .list()
            .map_err(SecretSyncError::Store)?
            .into_iter()
            .map(|i| i.name)
            .filter(|n| self.secret_allowed(hostname, n))
            .collect();
        if prune {
            let listed = tokio::time::timeout(SECRET_PUSH_TIMEOUT, r.vm.guest().readdir(crate::secrets::GUEST_DIR))
                .await
                .map_err(|_| SecretSyncError::ListTimeout)?;
            let extra: Vec<String> = match listed {
                Ok(entries) => entries
                    .into_iter()
                    .map(|e| e.name)
                    .filter(|n| crate::secrets::valid_name(n) && !names.contains(n))
                    .collect(),
                Err(e) if e.is_not_found() => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            names.extend(extra);
        }
        for name in names {
            tokio::time::timeout(SECRET_PUSH_TIMEOUT, self.apply_secret(hostname, r.vm.as_ref(), &name))
                .await
                .map_err(|_| SecretSyncError::PushTimeout(name.clone()))??;
        }
        Ok(())
    }

    /// A full secret sync of a VM, in the background.
    pub(super) fn resync_secrets(self: &Arc<Self>, hostname: &str, r: &Arc<Running>) {
        let (me, h, r) = (self.clone(), hostname.to_string(), r.clone());
        tokio::spawn(async move {
            if let Err(e) = me.sync_secrets(&h, &r, true).await {
                tracing::warn!("VM {h}: syncing secrets: {:#}", GuestText(&e));
            }
        });
    }

    /// After secret `name` changed in the store: every running VM that may have it gets the
    /// change in the background, one push at a time per VM, each reading the store when its
    /// turn comes (so no order of pushes can leave an old value behind) and bounded by
    /// [`SECRET_PUSH_TIMEOUT`]. Failures are logged; the next start syncs again. A guest that
    /// does not answer delays no other. Returns the pushes to ready VMs whose queue was idle,
    /// which a caller may wait for a little.
    pub fn spread_secret(self: &Arc<Self>, name: &str) -> Vec<tokio::task::JoinHandle<()>> {
        let running: Vec<(String, Arc<Running>)> = self
            .vms()
            .iter()
            .filter(|(_, r)| r.vm.is_running() && !r.paused.load(Ordering::SeqCst))
            .map(|(h, r)| (h.clone(), r.clone()))
            .collect();
        let mut idle = Vec::new();
        for (hostname, r) in running {
            if !self.secret_allowed(&hostname, name) {
                continue;
            }
            // A push still waiting for its turn reads the new value then.
            if !r.pending_secrets().insert(name.to_string()) {
                continue;
            }
            let was_idle = r.vm.is_ready() && r.secrets_turn.try_lock().is_ok();
            let (me, name) = (self.clone(), name.to_string());
            let push = tokio::spawn(async move {
                let _turn = r.secrets_turn.lock().await;
                r.pending_secrets().remove(&name);
                if !r.vm.is_running() {
                    return;
                }
                match tokio::time::timeout(SECRET_PUSH_TIMEOUT, me.apply_secret(&hostname, r.vm.as_ref(), &name)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("VM {hostname}: updating secret {name}: {:#}", GuestText(&e)),
                    Err(_) => tracing::warn!(
                        "VM {hostname}: updating secret {name}: the guest did not answer within {SECRET_PUSH_TIMEOUT:?}"
                    ),
                }
            });
            if was_idle {
                idle.push(push);
            }
        }
        idle
    }
}

/// Why a guest's secrets could not be brought in line with the store (logged: the next
/// start syncs again).
#[derive(Debug, thiserror::Error)]
pub enum SecretSyncError {
    /// The guest agent failed or refused.
    #[error(transparent)]
    Agent(#[from] slicer_agent_client::AgentError),
    /// The secret store could not be read (printed with its causes: it is logged whole).
    #[error("{}", slicer_error::chain_string(.0))]
    Store(crate::secrets::StoreError),
    #[error("the guest did not list its secrets in time")]
    ListTimeout,
    #[error("secret {0}: the guest did not answer within {SECRET_PUSH_TIMEOUT:?}")]
    PushTimeout(String),
}

/// What a change to a secret asks for (an update): `None` keeps what is stored.
#[derive(Debug, Default)]
pub struct SecretChange {
    pub value: Option<Vec<u8>>,
    pub permissions: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The secret store's operations. Each change is made under one lock and then spread to the
/// running VMs that may have the secret; the pushes to VMs that were idle are returned for the
/// caller to wait on a little ([`settle_pushes`]).
impl Manager {
    pub fn list_secrets(&self) -> Result<Vec<SecretInfo>, Error> {
        self.secrets.list().map_err(Error::host)
    }

    /// A new secret; a conflict when one of that name exists.
    pub async fn create_secret(
        self: &Arc<Self>,
        info: SecretInfo,
        value: &[u8],
    ) -> Result<(SecretInfo, Vec<tokio::task::JoinHandle<()>>), Error> {
        let _guard = self.secrets_lock.lock().await;
        if self.secrets.info(&info.name).map_err(Error::host)?.is_some() {
            return Err(Error::conflict(format!(
                "secret {:?} exists: update it with PATCH",
                info.name
            )));
        }
        self.secrets.put(&info, value).map_err(Error::host)?;
        let pushes = self.spread_secret(&info.name);
        Ok((info, pushes))
    }

    pub async fn update_secret(
        self: &Arc<Self>,
        name: &str,
        change: SecretChange,
    ) -> Result<(SecretInfo, Vec<tokio::task::JoinHandle<()>>), Error> {
        let _guard = self.secrets_lock.lock().await;
        let mut info = self
            .secrets
            .info(name)
            .map_err(Error::host)?
            .ok_or_else(|| Error::not_found(format!("secret {name:?} not found")))?;
        let value = match change.value {
            Some(v) => v,
            None => self.secrets.value(name).map_err(Error::host)?,
        };
        info.size = value.len() as u64;
        if let Some(p) = change.permissions {
            info.permissions = p;
        }
        info.uid = change.uid.unwrap_or(info.uid);
        info.gid = change.gid.unwrap_or(info.gid);
        info.modified_at = stamp();
        self.secrets.put(&info, &value).map_err(Error::host)?;
        let pushes = self.spread_secret(name);
        Ok((info, pushes))
    }

    pub async fn delete_secret(self: &Arc<Self>, name: &str) -> Result<Vec<tokio::task::JoinHandle<()>>, Error> {
        let _guard = self.secrets_lock.lock().await;
        if self.secrets.info(name).map_err(Error::host)?.is_none() {
            return Err(Error::not_found(format!("secret {name:?} not found")));
        }
        self.secrets.remove(name).map_err(Error::host)?;
        Ok(self.spread_secret(name))
    }
}
