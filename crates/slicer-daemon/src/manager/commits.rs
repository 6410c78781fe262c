//! Cold fork: commit a stopped persistent VM's disk, fork new VMs from it.
//!
//! A commit takes the VM's qcow2 overlay as it is (a rename: no copy) into
//! `<data_dir>/commits/<id>/disk.qcow2`, read-only from then on, and gives the VM a new empty
//! overlay on top of it, so the source now depends on the commit. A fork is a new VM whose
//! overlay sits on the commit's disk: forks share it copy-on-write, and a write in one is seen
//! by no other. A commit is removed only when no VM (its source, its forks) and no other
//! commit sits on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use slicer_agent_proto::ExecRequest;
use slicer_api::{
    CommitDeleted, CommitInfo, CommitRequest, CommitResponse, CreateNodeRequest, ForkRequest, ForkResponse,
};

use super::{detached, now_rfc3339, vm_name, Manager, Wait};
use crate::error::ApiErr;
use crate::state::{CommitRecord, VmRecord};

/// A new VM's disk comes from this commit.
pub(crate) struct ForkFrom {
    pub commit_id: String,
    pub new_machine_id: bool,
}

/// `GET /vm/commits` filters.
#[derive(Debug, Default)]
pub struct CommitFilter {
    pub tags: Vec<String>,
    pub cache_key: Option<String>,
    pub source: Option<String>,
    pub mode: Option<String>,
}

const FIXUPS: &[&str] = &["hostname", "machine-id", "ssh-host-keys"];

/// Most disks a VM's backing chain may hold below its overlay (each commit adds one; the jail
/// reads at most 16 and QEMU slows down with every level).
pub const MAX_CHAIN: usize = 10;
/// Most commits a daemon keeps (each holds a disk).
pub const MAX_COMMITS: usize = 1024;

/// Commit ids are ours (hex), but a path segment from a client is checked before any use.
pub fn valid_commit_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn check_tags(tags: &[String]) -> Result<(), ApiErr> {
    if tags.len() > 64 {
        return Err(ApiErr::bad_request("at most 64 tags"));
    }
    for t in tags {
        if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
            return Err(ApiErr::bad_request(format!(
                "invalid tag {t:?}: 1-256 printable characters"
            )));
        }
    }
    Ok(())
}

fn info(c: &CommitRecord) -> CommitInfo {
    CommitInfo {
        commit_id: c.commit_id.clone(),
        source_hostname: c.source_hostname.clone(),
        source_host_group: c.source_host_group.clone(),
        created_at: c.created_at.clone(),
        mode: "disk".into(),
        tags: c.tags.clone(),
        labels: c.labels.clone(),
        cache_key: c.cache_key.clone(),
    }
}

impl Manager {
    fn commit_disk(&self, id: &str) -> PathBuf {
        self.commits_dir.join(id).join("disk.qcow2")
    }

    /// `POST /vm/{h}/commit`.
    pub async fn commit(self: &Arc<Self>, hostname: &str, req: CommitRequest) -> Result<CommitResponse, ApiErr> {
        check_tags(&req.tags)?;
        if req.labels.len() > 64
            || req.labels.iter().any(|(k, v)| {
                k.is_empty() || k.len() > 128 || v.len() > 1024 || k.chars().chain(v.chars()).any(char::is_control)
            })
        {
            return Err(ApiErr::bad_request(
                "labels: at most 64, keys 1-128 and values up to 1024 printable characters",
            ));
        }
        if let Some(k) = &req.cache_key {
            if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) {
                return Err(ApiErr::bad_request("cache_key: 1-256 printable characters"));
            }
        }
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            // One commit (or commit removal) at a time: commits with one cache key are
            // serialised, and a key's owner is checked and taken in one step.
            let _commits = me.commit_lock.lock().await;
            let _op = me.lock_vm(&h).await;
            let rec = me.record(&h)?;
            if !rec.persistent {
                return Err(ApiErr::conflict(format!(
                    "VM {h} is not persistent: only a persistent VM's disk outlives it to be committed"
                )));
            }
            if me.vms().contains_key(&h) || rec.status != slicer_api::STATUS_STOPPED {
                return Err(ApiErr::conflict(format!(
                    "VM {h} is {}: shut it down first (POST /vm/{h}/shutdown?action=shutdown, or slicer vm shutdown {h})",
                    rec.status.to_lowercase()
                )));
            }
            let commits = me.db.commits().map_err(ApiErr::internal)?;
            if commits.len() >= MAX_COMMITS {
                return Err(ApiErr::conflict(format!(
                    "this daemon keeps at most {MAX_COMMITS} commits; delete some first (slicer vm commit delete ID)"
                )));
            }
            if let Some(k) = &req.cache_key {
                if let Some(other) = commits.iter().find(|c| c.cache_key.as_deref() == Some(k) && c.source_hostname != h) {
                    return Err(ApiErr::conflict(format!(
                        "cache key {k:?} belongs to commits of VM {}; use another key for VM {h}",
                        other.source_hostname
                    )));
                }
            }
            let disk = me.vm_dir(&h).join("disk.qcow2");
            if !disk.is_file() {
                return Err(ApiErr::conflict(format!("VM {h} has no disk to commit")));
            }
            let depth = slicer_vmm::jail::backing_chain(&disk).map(|c| c.len()).unwrap_or(0);
            if depth >= MAX_CHAIN {
                return Err(ApiErr::conflict(format!(
                    "VM {h}'s disk already sits on {depth} layers (commits of commits); fork a fresh VM from its latest commit instead"
                )));
            }
            let id = hex::encode(rand::random::<[u8; 10]>());
            let dir = me.commits_dir.join(&id);
            std::fs::create_dir_all(&dir).map_err(ApiErr::internal)?;
            let frozen = dir.join("disk.qcow2");
            std::fs::rename(&disk, &frozen).map_err(ApiErr::internal)?;
            if let Err(e) = slicer_storage::create_overlay(&frozen, &disk, rec.storage_size).await {
                let _ = std::fs::rename(&frozen, &disk);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ApiErr::internal(format!("committing VM {h}: {e:#}")));
            }
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&frozen, std::fs::Permissions::from_mode(0o444));
            let (last, parent) = me.db.lineage(&h).map_err(ApiErr::internal)?;
            let c = CommitRecord {
                commit_id: id.clone(),
                source_hostname: h.clone(),
                source_host_group: rec.host_group.clone(),
                created_at: now_rfc3339(),
                cache_key: req.cache_key.clone(),
                tags: req.tags.clone(),
                labels: req.labels.clone(),
                image: rec.image.clone(),
                storage_size: rec.storage_size,
                base_commit: last.or(parent.clone()),
            };
            me.db.add_commit(&c).map_err(ApiErr::internal)?;
            me.db
                .set_lineage(&h, Some(&id), parent.as_deref())
                .map_err(ApiErr::internal)?;
            tracing::info!(vm = %h, commit = %id, cache_key = ?req.cache_key, "committed");
            Ok(CommitResponse {
                hostname: h,
                commit_id: id,
                status: "committed".into(),
                parent_status: Some("stopped".into()),
                mode: "disk".into(),
                tags: req.tags,
                labels: req.labels,
                cache_key: req.cache_key,
            })
        })
        .await
    }

    /// `GET /vm/commits`.
    pub fn commits(&self, f: &CommitFilter) -> Result<Vec<CommitInfo>, ApiErr> {
        if f.mode.as_deref().is_some_and(|m| m != "disk") {
            return Ok(Vec::new());
        }
        Ok(self
            .db
            .commits()
            .map_err(ApiErr::internal)?
            .iter()
            .filter(|c| f.cache_key.as_ref().is_none_or(|k| c.cache_key.as_ref() == Some(k)))
            .filter(|c| f.source.as_ref().is_none_or(|s| &c.source_hostname == s))
            .filter(|c| f.tags.iter().all(|t| c.tags.contains(t)))
            .map(info)
            .collect())
    }

    /// `DELETE /vm/commits/{id}`: refused while a VM or another commit sits on it.
    pub async fn delete_commit(self: &Arc<Self>, id: &str) -> Result<CommitDeleted, ApiErr> {
        if !valid_commit_id(id) {
            return Err(ApiErr::bad_request(format!("{id:?} is not a commit id")));
        }
        let _commits = self.commit_lock.lock().await;
        if self.db.commit(id).map_err(ApiErr::internal)?.is_none() {
            return Err(ApiErr::not_found(format!("no commit {id}")));
        }
        let users = self.db.commit_dependents(id).map_err(ApiErr::internal)?;
        if !users.is_empty() {
            return Err(ApiErr::conflict(format!(
                "commit {id} is in use by {}; delete those first",
                users.join(", ")
            )));
        }
        let dir = self.commits_dir.join(id);
        let doomed = self.commits_dir.join(format!(".deleting-{id}"));
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&doomed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ApiErr::internal(format!("removing {}: {e}", dir.display()))),
        }
        self.db.delete_commit(id).map_err(ApiErr::internal)?;
        Ok(CommitDeleted {
            commit_id: id.to_string(),
            status: "deleted".into(),
        })
    }

    /// The fork's disk: an overlay on the commit's, made under the commit lock (so the commit
    /// cannot go meanwhile) and recorded as the fork's parent.
    pub(super) async fn prepare_fork(&self, rec: &VmRecord, f: &ForkFrom) -> Result<(), ApiErr> {
        let _commits = self.commit_lock.lock().await;
        if self.db.commit(&f.commit_id).map_err(ApiErr::internal)?.is_none() {
            return Err(ApiErr::not_found(format!("commit {} was deleted", f.commit_id)));
        }
        let dir = self.vm_dir(&rec.hostname);
        std::fs::create_dir_all(&dir).map_err(ApiErr::internal)?;
        slicer_storage::create_overlay(
            &self.commit_disk(&f.commit_id),
            &dir.join("disk.qcow2"),
            rec.storage_size,
        )
        .await
        .map_err(|e| ApiErr::internal(format!("{e:#}")))?;
        self.db
            .set_lineage(&rec.hostname, None, Some(&f.commit_id))
            .map_err(ApiErr::internal)?;
        if f.new_machine_id {
            self.fresh_ids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(rec.hostname.clone());
        }
        Ok(())
    }

    /// `POST /vm/commits/{id}/fork`: a new allocator-named VM of the commit's host group on
    /// the commit's disk.
    pub async fn fork(
        self: &Arc<Self>,
        id: &str,
        req: ForkRequest,
        wait: bool,
        timeout: Duration,
    ) -> Result<ForkResponse, ApiErr> {
        if !valid_commit_id(id) {
            return Err(ApiErr::bad_request(format!("{id:?} is not a commit id")));
        }
        let c = self
            .db
            .commit(id)
            .map_err(ApiErr::internal)?
            .ok_or_else(|| ApiErr::not_found(format!("no commit {id}")))?;
        let g = self
            .group(&c.source_host_group)
            .map_err(|_| {
                ApiErr::conflict(format!(
                    "commit {id} was made in host group {}, which the config no longer has",
                    c.source_host_group
                ))
            })?
            .clone();
        let fixups = req
            .fixups
            .clone()
            .unwrap_or_else(|| FIXUPS.iter().map(|s| s.to_string()).collect());
        if let Some(bad) = fixups.iter().find(|f| !FIXUPS.contains(&f.as_str())) {
            return Err(ApiErr::bad_request(format!(
                "fixups: unknown {bad:?}; use {}",
                FIXUPS.join(", ")
            )));
        }
        let tags = match req.tag_mode.as_deref() {
            None | Some("append") => c.tags.iter().chain(req.tags.iter()).cloned().collect(),
            Some("replace") => req.tags.clone(),
            Some(other) => {
                return Err(ApiErr::bad_request(format!(
                    "tag_mode: {other:?}; use append or replace"
                )))
            }
        };
        let create = CreateNodeRequest {
            cpus: req.vcpu,
            ram_bytes: req.ram_bytes,
            tags,
            persistent: Some(req.persistent.unwrap_or(true)),
            network: req.network.clone(),
            secrets: req.secrets.clone(),
            ..Default::default()
        };
        let mut rec = self.new_record(&g, &create)?;
        rec.image = c.image.clone();
        rec.storage_size = c.storage_size;
        // The builder's userdata ran on the committed disk; a fork does not run it again.
        rec.userdata = None;
        if let Some(n) = &create.network {
            self.check_override(&g, n)?;
            rec.net_allow = n.allow.clone();
            rec.net_drop = n.drop.clone();
        }
        if let Some(names) = &create.secrets {
            if let Some(bad) = names.iter().find(|n| !crate::secrets::valid_name(n)) {
                return Err(ApiErr::bad_request(format!("secrets: {bad:?} is not a secret name")));
            }
        }
        if create.tags.iter().filter(|t| t.starts_with("name=")).count() > 1 {
            return Err(ApiErr::bad_request("tags: at most one name= tag"));
        }
        if let Some(name) = vm_name(&create.tags) {
            self.check_name(name, None)?;
        }
        let from = ForkFrom {
            commit_id: id.to_string(),
            new_machine_id: fixups.iter().any(|f| f == "machine-id"),
        };
        let me = self.clone();
        let secrets = create.secrets.clone();
        let (rec, running) =
            detached(async move { me.record_and_launch(rec, secrets, Vec::new(), Some(from)).await }).await?;
        let host_keys = fixups.iter().any(|f| f == "ssh-host-keys");
        let finish = {
            let me = self.clone();
            let hostname = rec.hostname.clone();
            async move {
                let ready = tokio::time::timeout(timeout, me.wait_for(&running, Wait::Agent)).await;
                let result = match ready {
                    Ok(Ok(())) if host_keys => forget_host_keys(&running.vm).await,
                    Ok(r) => r,
                    Err(_) => Err(format!(
                        "VM {hostname} was not ready within {timeout:?}; it was deleted"
                    )),
                };
                if let Err(e) = &result {
                    tracing::warn!("fork {hostname}: {e}; deleting it");
                    let _ = me.delete(&hostname, true).await;
                }
                result
            }
        };
        let child_status = if wait {
            finish.await.map_err(ApiErr::internal)?;
            "running"
        } else {
            tokio::spawn(finish);
            "starting"
        };
        Ok(ForkResponse {
            hostname: rec.hostname.clone(),
            source_hostname: c.source_hostname.clone(),
            commit_id: Some(id.to_string()),
            status: "forked".into(),
            parent_status: None,
            child_status: Some(child_status.into()),
            mode: "disk".into(),
            persistent: rec.persistent,
            ip: rec.ip.clone(),
        })
    }
}

/// The builder's SSH host keys are not the fork's: they go, and the socket-activated sshd of
/// our images makes new ones on the first connection.
async fn forget_host_keys(vm: &slicer_vmm::Vm) -> Result<(), String> {
    let req = ExecRequest::argv([
        "/bin/sh",
        "-c",
        "rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub",
    ]);
    match vm.agent().exec_output(&req, None).await {
        Ok(o) if o.status.code == Some(0) => Ok(()),
        Ok(o) => Err(format!("removing the SSH host keys: exit {:?}", o.status.code)),
        // An image without /bin/sh has no sshd either.
        Err(e) => {
            tracing::debug!("removing the SSH host keys: {e:#}");
            Ok(())
        }
    }
}

impl Manager {
    /// `GET /vm/{h}/disk`: the stopped VM's disk (its whole backing chain) as one standalone
    /// qcow2 file, written beside it and handed back open (already unlinked, so it goes with
    /// the answer however that ends).
    pub async fn export_disk(self: &Arc<Self>, hostname: &str) -> Result<(std::fs::File, u64), ApiErr> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let rec = me.record(&h)?;
            if me.vms().contains_key(&h) || rec.status != slicer_api::STATUS_STOPPED {
                return Err(ApiErr::conflict(format!(
                    "VM {h} is {}: shut it down first, so that its disk is consistent",
                    rec.status.to_lowercase()
                )));
            }
            let disk = me.vm_dir(&h).join("disk.qcow2");
            if !disk.is_file() {
                return Err(ApiErr::conflict(format!("VM {h} has no disk")));
            }
            let out = me
                .vm_dir(&h)
                .join(format!("export-{}.qcow2", hex::encode(rand::random::<[u8; 6]>())));
            let res = tokio::process::Command::new("qemu-img")
                .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
                .arg(&disk)
                .arg(&out)
                .output()
                .await;
            let opened = match res {
                Ok(o) if o.status.success() => std::fs::File::open(&out).map_err(ApiErr::internal),
                Ok(o) => Err(ApiErr::internal(format!(
                    "qemu-img convert: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))),
                Err(e) => Err(ApiErr::internal(format!("running qemu-img: {e}"))),
            };
            let _ = std::fs::remove_file(&out);
            let f = opened?;
            let len = f.metadata().map_err(ApiErr::internal)?.len();
            Ok((f, len))
        })
        .await
    }
}
