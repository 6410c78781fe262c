//! Commit and fork: cold (a stopped persistent VM's disk) and live (a running VM's disk,
//! memory and devices), forks from either.
//!
//! A commit takes the VM's qcow2 overlay as it is (a rename: no copy) into
//! `<data_dir>/commits/<id>/disk.qcow2`, read-only from then on, and gives the VM a new empty
//! overlay on top of it, so the source now depends on the commit. A fork is a new VM whose
//! overlay sits on the commit's disk: forks share it copy-on-write, and a write in one is seen
//! by no other. A commit is removed only when no VM (its source, its forks) and no other
//! commit sits on it.
//!
//! A live commit (`live: true`, an extension) captures a running VM ([`slicer_vmm::Host::capture`]):
//! its directory holds a copy of the VM's overlay (on the VM's own chain), its RAM and its
//! devices, in a template's layout; the source pauses for the copy and continues, and does not
//! sit on the commit. Its forks are restored from it: they continue the captured guest with
//! their own identity, their RAM mapped copy-on-write from the capture.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use slicer_agent_proto::ExecRequest;
use slicer_api::{ChildStatus, CommitMode, CommitRequest, CreateNodeRequest, Fixup, ForkRequest, TagMode, VmStatus};

use super::{detached, stamp, vm_name, Error, GuestText, HostCause, Machine, Manager, NotReady, Wait};

use crate::state::{CommitRecord, VmRecord};

/// A new VM's disk comes from this commit.
pub(crate) struct ForkFrom {
    pub commit_id: String,
    pub new_machine_id: bool,
    /// A live commit's capture: the fork is restored from it.
    pub live: Option<Arc<slicer_vmm::Template>>,
}

/// Which commits a listing shows (every given filter must match).
#[derive(Debug, Default)]
pub struct CommitFilter {
    pub tags: Vec<String>,
    pub cache_key: Option<String>,
    pub source: Option<String>,
    pub mode: Option<CommitMode>,
}

/// Most disks a VM's backing chain may hold below its overlay (each commit adds one; the jail
/// reads at most 16 and QEMU slows down with every level).
pub const MAX_CHAIN: usize = 10;
/// Most commits a daemon keeps (each holds a disk).
pub const MAX_COMMITS: usize = 1024;
/// Most forks one call makes (`count`).
pub const MAX_FORK_COUNT: u32 = 32;

/// Commit ids are ours (hex), but a path segment from a client is checked before any use.
pub fn valid_commit_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn check_tags(tags: &[String]) -> Result<(), Error> {
    if tags.len() > 64 {
        return Err(Error::invalid("at most 64 tags"));
    }
    for t in tags {
        if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
            return Err(Error::invalid(format!("invalid tag {t:?}: 1-256 printable characters")));
        }
    }
    Ok(())
}

/// A commit as the manager tells of it: its record and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub commit_id: String,
    pub source_hostname: String,
    pub source_host_group: String,
    /// When it was made, as its record keeps it (RFC 3339, UTC).
    pub created_at: String,
    pub mode: CommitMode,
    pub tags: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub cache_key: Option<String>,
}

impl Commit {
    fn of(c: CommitRecord, mode: CommitMode) -> Commit {
        Commit {
            commit_id: c.commit_id,
            source_hostname: c.source_hostname,
            source_host_group: c.source_host_group,
            created_at: c.created_at,
            mode,
            tags: c.tags,
            labels: c.labels,
            cache_key: c.cache_key,
        }
    }
}

/// A VM a fork made.
#[derive(Debug, Clone, PartialEq)]
pub struct Forked {
    pub hostname: String,
    pub source_hostname: String,
    pub commit_id: String,
    /// Running (its agent answers) or starting (not waited for).
    pub child: ChildStatus,
    pub mode: CommitMode,
    pub persistent: bool,
    /// `None`: the VM has no network.
    pub ip: Option<super::VmAddr>,
}

/// The record of a new commit `id` of VM `rec`, whose disk sits on `base_commit`.
fn commit_record(id: &str, rec: &VmRecord, req: &CommitRequest, base_commit: Option<String>) -> CommitRecord {
    CommitRecord {
        commit_id: id.to_string(),
        source_hostname: rec.hostname.clone(),
        source_host_group: rec.host_group.clone(),
        created_at: stamp(),
        cache_key: req.cache_key.clone(),
        tags: req.tags.clone(),
        labels: req.labels.clone(),
        image: rec.image.clone(),
        storage_size: rec.storage_size,
        base_commit,
    }
}

impl Manager {
    fn commit_disk(&self, id: &str) -> PathBuf {
        self.commits_dir.join(id).join("disk.qcow2")
    }

    /// `Live` when the commit holds a capture (memory and devices), else `Disk`. The commit's
    /// record does not keep its mode: its directory tells, here alone.
    fn commit_mode(&self, id: &str) -> CommitMode {
        match self.commits_dir.join(id).join("state").is_file() {
            true => CommitMode::Live,
            false => CommitMode::Disk,
        }
    }

    /// A live commit's capture. Its memory is loaded by the first restore and kept with the
    /// templates' (bounded by `config.capacity.template_memory_bytes`, least recently used
    /// out first).
    fn capture_of(&self, id: &str) -> Result<Arc<slicer_vmm::Template>, Error> {
        Ok(Arc::new(
            slicer_vmm::Template::open(&self.commits_dir.join(id))
                .map_err(|e| Error::host(HostCause::context(e, format!("commit {id}"))))?,
        ))
    }

    /// Commits a VM: a stopped persistent VM's disk, or (`live`) a running VM's disk, memory
    /// and devices.
    pub async fn commit(self: &Arc<Self>, hostname: &str, req: CommitRequest) -> Result<Commit, Error> {
        check_tags(&req.tags)?;
        if req.labels.len() > 64
            || req.labels.iter().any(|(k, v)| {
                k.is_empty() || k.len() > 128 || v.len() > 1024 || k.chars().chain(v.chars()).any(char::is_control)
            })
        {
            return Err(Error::invalid(
                "labels: at most 64, keys 1-128 and values up to 1024 printable characters",
            ));
        }
        if let Some(k) = &req.cache_key {
            if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) {
                return Err(Error::invalid("cache_key: 1-256 printable characters"));
            }
        }
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            // One commit (or commit removal) at a time: commits with one cache key are
            // serialised, and a key's owner is checked and taken in one step.
            let _commits = me.commit_lock.lock().await;
            let _op = me.lock_vm(&h).await;
            let rec = me.record(&h)?;
            if req.live == Some(true) {
                return me.commit_live(rec, req).await;
            }
            if !rec.persistent {
                return Err(Error::conflict(format!(
                    "VM {h} is not persistent: only a persistent VM's disk outlives it to be committed"
                )));
            }
            if me.vms().contains_key(&h) || rec.status != VmStatus::Stopped {
                return Err(Error::conflict(format!(
                    "VM {h} is {}: shut it down first (POST /vm/{h}/shutdown?action=shutdown, or slicer vm shutdown {h})",
                    rec.status.as_str().to_lowercase()
                )));
            }
            me.check_commit_room(&h, &req)?;
            let disk = me.vm_dir(&h).join("disk.qcow2");
            let id = hex::encode(rand::random::<[u8; 10]>());
            let dir = me.commits_dir.join(&id);
            std::fs::create_dir_all(&dir).map_err(Error::host)?;
            let frozen = dir.join("disk.qcow2");
            // The chain recorded for the disk goes with it (never the header the VM's QEMU could
            // rewrite); the commit is root's and read-only from now on.
            slicer_storage::rename_disk(&disk, &frozen).map_err(Error::host)?;
            if let Err(e) = slicer_storage::create_overlay(&frozen, &disk, rec.storage_size).await {
                let _ = slicer_storage::rename_disk(&frozen, &disk);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::host(HostCause::context(e, format!("committing VM {h}"))));
            }
            use std::os::unix::fs::PermissionsExt;
            let _ = std::os::unix::fs::lchown(&frozen, Some(0), Some(0));
            let _ = std::fs::set_permissions(&frozen, std::fs::Permissions::from_mode(0o444));
            let (last, parent) = me.db.lineage(&h).map_err(Error::host)?;
            let c = commit_record(&id, &rec, &req, last.or(parent.clone()));
            me.db.add_commit(&c).map_err(Error::host)?;
            me.db
                .set_lineage(&h, Some(&id), parent.as_deref())
                .map_err(Error::host)?;
            tracing::info!(vm = %h, commit = %id, cache_key = ?req.cache_key, "committed");
            Ok(Commit::of(c, CommitMode::Disk))
        })
        .await
    }

    /// What every commit checks first: room for one more, the cache key's owner, a disk that
    /// is not too deep.
    fn check_commit_room(&self, h: &str, req: &CommitRequest) -> Result<(), Error> {
        let commits = self.db.commits().map_err(Error::host)?;
        if commits.len() >= MAX_COMMITS {
            return Err(Error::conflict(format!(
                "this daemon keeps at most {MAX_COMMITS} commits; delete some first (slicer vm commit delete ID)"
            )));
        }
        if let Some(k) = &req.cache_key {
            if let Some(other) = commits
                .iter()
                .find(|c| c.cache_key.as_deref() == Some(k) && c.source_hostname != h)
            {
                return Err(Error::conflict(format!(
                    "cache key {k:?} belongs to commits of VM {}; use another key for VM {h}",
                    other.source_hostname
                )));
            }
        }
        let disk = self.vm_dir(h).join("disk.qcow2");
        if !disk.is_file() {
            return Err(Error::conflict(format!("VM {h} has no disk to commit")));
        }
        let depth = slicer_storage::trusted_chain(&disk).map(|c| c.len()).unwrap_or(0);
        if depth >= MAX_CHAIN {
            return Err(Error::conflict(format!(
                "VM {h}'s disk already sits on {depth} layers (commits of commits); fork a fresh VM from its latest commit instead"
            )));
        }
        Ok(())
    }

    /// A live commit of the running VM `rec` (commit lock and the VM's lock held).
    async fn commit_live(&self, rec: VmRecord, req: CommitRequest) -> Result<Commit, Error> {
        let h = rec.hostname.clone();
        let r = match self.vms().get(&h) {
            Some(r) if rec.status == VmStatus::Running => r.clone(),
            _ => {
                return Err(Error::conflict(format!(
                    "VM {h} is {}: a live commit needs a running VM (a stopped one commits without live)",
                    rec.status.as_str().to_lowercase()
                )))
            }
        };
        if r.paused.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::conflict(format!("VM {h} is paused: resume it first")));
        }
        if !r.vm.is_ready() {
            return Err(Error::conflict(format!(
                "VM {h} is still starting: wait until it is ready"
            )));
        }
        self.check_commit_room(&h, &req)?;
        let id = hex::encode(rand::random::<[u8; 10]>());
        let shape = slicer_vmm::Shape {
            image: rec.image.clone(),
            cpus: rec.cpus,
            memory_mib: (rec.ram_bytes >> 20) as u32,
            nic: self.nets.contains_key(&rec.host_group),
        };
        let dir = self.commits_dir.join(&id);
        let vm = r.vm.qemu().ok_or_else(|| {
            Error::conflict(format!(
                "VM {h} cannot be committed live: its backend cannot capture it"
            ))
        })?;
        let (_, times) = self
            .host
            .capture(vm, &shape, &dir)
            .await
            .map_err(|e| Error::host(HostCause::context(e, format!("committing VM {h} live"))))?;
        // The copy sits on the source's chain: on its last commit, or the one it was forked from.
        let (last, parent) = self.db.lineage(&h).map_err(Error::host)?;
        let c = commit_record(&id, &rec, &req, last.or(parent));
        if let Err(e) = self.db.add_commit(&c) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Error::host(e));
        }
        tracing::info!(vm = %h, commit = %id, paused_ms = times.paused.as_millis() as u64, "committed live");
        Ok(Commit::of(c, CommitMode::Live))
    }

    /// The commits that match `f`.
    pub fn commits(&self, f: &CommitFilter) -> Result<Vec<Commit>, Error> {
        Ok(self
            .db
            .commits()
            .map_err(Error::host)?
            .into_iter()
            .filter(|c| f.cache_key.as_ref().is_none_or(|k| c.cache_key.as_ref() == Some(k)))
            .filter(|c| f.source.as_ref().is_none_or(|s| &c.source_hostname == s))
            .filter(|c| f.tags.iter().all(|t| c.tags.contains(t)))
            .map(|c| {
                let mode = self.commit_mode(&c.commit_id);
                Commit::of(c, mode)
            })
            .filter(|c| f.mode.is_none_or(|m| c.mode == m))
            .collect())
    }

    /// Removes a commit: refused while a VM or another commit sits on it.
    pub async fn delete_commit(self: &Arc<Self>, id: &str) -> Result<(), Error> {
        if !valid_commit_id(id) {
            return Err(Error::invalid(format!("{id:?} is not a commit id")));
        }
        let _commits = self.commit_lock.lock().await;
        if self.db.commit(id).map_err(Error::host)?.is_none() {
            return Err(Error::not_found(format!("no commit {id}")));
        }
        let users = self.db.commit_dependents(id).map_err(Error::host)?;
        if !users.is_empty() {
            return Err(Error::conflict(format!(
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
            Err(e) => {
                return Err(Error::host(HostCause::context(
                    e,
                    format!("removing {}", dir.display()),
                )))
            }
        }
        self.db.delete_commit(id).map_err(Error::host)?;
        self.host.template_memory.forget(&dir);
        Ok(())
    }

    /// The fork's disk: an overlay on the commit's, made under the commit lock (so the commit
    /// cannot go meanwhile) and recorded as the fork's parent.
    pub(super) async fn prepare_fork(&self, rec: &VmRecord, f: &ForkFrom) -> Result<(), Error> {
        let _commits = self.commit_lock.lock().await;
        if self.db.commit(&f.commit_id).map_err(Error::host)?.is_none() {
            return Err(Error::not_found(format!("commit {} was deleted", f.commit_id)));
        }
        if f.live.is_some() {
            // Restored from the capture, which makes the VM's directory and overlay.
            self.db
                .set_lineage(&rec.hostname, None, Some(&f.commit_id))
                .map_err(Error::host)?;
            return Ok(());
        }
        let dir = self.vm_dir(&rec.hostname);
        std::fs::create_dir_all(&dir).map_err(Error::host)?;
        slicer_storage::create_overlay(
            &self.commit_disk(&f.commit_id),
            &dir.join("disk.qcow2"),
            rec.storage_size,
        )
        .await
        .map_err(Error::host)?;
        self.db
            .set_lineage(&rec.hostname, None, Some(&f.commit_id))
            .map_err(Error::host)?;
        Ok(())
    }

    /// Forks of commit `id`: new allocator-named VMs (one, or `count`) of the commit's host
    /// group on the commit's disk; from a live commit, restored from its capture. Several are
    /// made concurrently, all or none: if one fails, the others go.
    pub async fn fork(
        self: &Arc<Self>,
        id: &str,
        req: ForkRequest,
        wait: bool,
        timeout: Duration,
    ) -> Result<Vec<Forked>, Error> {
        let plan = self.fork_plan(id, &req)?;
        let results =
            futures_util::future::join_all((0..plan.count).map(|_| self.fork_one(&plan, wait, timeout))).await;
        if results.iter().any(Result::is_err) {
            for made in results.iter().flatten() {
                let _ = self.delete(&made.hostname, true).await;
            }
            let first = results.into_iter().find_map(Result::err);
            return Err(first.unwrap_or_else(|| Error::host_msg("fork failed")));
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// A fork request checked against its commit, once for all its forks.
    fn fork_plan(&self, id: &str, req: &ForkRequest) -> Result<ForkPlan, Error> {
        if !valid_commit_id(id) {
            return Err(Error::invalid(format!("{id:?} is not a commit id")));
        }
        let count = req.count.unwrap_or(1);
        if !(1..=MAX_FORK_COUNT).contains(&count) {
            return Err(Error::invalid(format!("count: {count}; use 1 to {MAX_FORK_COUNT}")));
        }
        let c = self
            .db
            .commit(id)
            .map_err(Error::host)?
            .ok_or_else(|| Error::not_found(format!("no commit {id}")))?;
        let group = self
            .group(&c.source_host_group)
            .map_err(|_| {
                Error::conflict(format!(
                    "commit {id} was made in host group {}, which the config no longer has",
                    c.source_host_group
                ))
            })?
            .clone();
        let fixups = fixups(req.fixups.as_deref())?;
        let tags: Vec<String> = match req.tag_mode.as_deref().map(|m| (m, TagMode::parse(m))) {
            None | Some((_, Some(TagMode::Append))) => c.tags.iter().chain(req.tags.iter()).cloned().collect(),
            Some((_, Some(TagMode::Replace))) => req.tags.clone(),
            Some((other, None)) => return Err(Error::invalid(format!("tag_mode: {other:?}; use append or replace"))),
        };
        let live = match self.commit_mode(id) {
            CommitMode::Live => Some(self.capture_of(id)?),
            CommitMode::Disk => None,
        };
        // A live fork continues the captured guest: same vCPUs and RAM.
        let shape = live
            .as_ref()
            .map(|t| (t.shape.cpus, u64::from(t.shape.memory_mib) << 20));
        if let Some((cpus, ram)) = shape {
            if req.vcpu.is_some_and(|v| v != cpus) || req.ram_bytes.is_some_and(|r| r != ram) {
                return Err(Error::invalid(format!(
                    "commit {id} is live: its forks continue its guest with its {cpus} vCPUs and {ram} bytes of RAM; leave vcpu and ram_bytes out"
                )));
            }
        }
        let create = CreateNodeRequest {
            cpus: shape.map(|s| s.0).or(req.vcpu),
            ram_bytes: shape.map(|s| s.1).or(req.ram_bytes),
            tags,
            persistent: Some(req.persistent.unwrap_or(true)),
            network: req.network.clone(),
            secrets: req.secrets.clone(),
            ..Default::default()
        };
        self.check_fork_create(&group, &create, count)?;
        Ok(ForkPlan {
            group,
            create,
            commit: c,
            fixups,
            live,
            count,
        })
    }

    /// What each fork's record would refuse, checked once for all.
    fn check_fork_create(&self, g: &crate::config::Group, create: &CreateNodeRequest, count: u32) -> Result<(), Error> {
        self.new_record(g, create)?;
        if let Some(n) = &create.network {
            self.check_override(g, n)?;
        }
        if let Some(names) = &create.secrets {
            if let Some(bad) = names.iter().find(|n| !crate::secrets::valid_name(n)) {
                return Err(Error::invalid(format!("secrets: {bad:?} is not a secret name")));
            }
        }
        if create.tags.iter().filter(|t| t.starts_with("name=")).count() > 1 {
            return Err(Error::invalid("tags: at most one name= tag"));
        }
        if let Some(name) = vm_name(&create.tags) {
            if count > 1 {
                return Err(Error::invalid("a name= tag names one VM: leave it out with count"));
            }
            self.check_name(name, None)?;
        }
        Ok(())
    }

    /// One fork of the plan's commit (see [`Manager::fork`]).
    async fn fork_one(self: &Arc<Self>, plan: &ForkPlan, wait: bool, timeout: Duration) -> Result<Forked, Error> {
        let (c, create) = (&plan.commit, &plan.create);
        let mut rec = self.new_record(&plan.group, create)?;
        rec.image = c.image.clone();
        rec.storage_size = c.storage_size;
        // The builder's userdata ran on the committed disk; a fork does not run it again.
        rec.userdata = None;
        if let Some(n) = &create.network {
            rec.net_allow = n.allow.clone();
            rec.net_drop = n.drop.clone();
        }
        let mode = if plan.live.is_some() {
            CommitMode::Live
        } else {
            CommitMode::Disk
        };
        let from = ForkFrom {
            commit_id: c.commit_id.clone(),
            new_machine_id: plan.fixups.contains(&Fixup::MachineId),
            live: plan.live.clone(),
        };
        let new = super::NewVm {
            secrets: create.secrets.clone(),
            ssh_keys: Vec::new(),
            fork: Some(from),
            proxy: None,
        };
        let me = self.clone();
        let (rec, running) = detached(async move { me.record_and_launch(rec, new).await }).await?;
        let host_keys = plan.fixups.contains(&Fixup::SshHostKeys);
        let finish = {
            let me = self.clone();
            let hostname = rec.hostname.clone();
            async move {
                let ready = tokio::time::timeout(timeout, me.wait_for(&running, Wait::Agent)).await;
                let result = match ready {
                    Ok(Ok(())) if host_keys => forget_host_keys(running.vm.as_ref()).await,
                    Ok(r) => r,
                    Err(_) => Err(NotReady(format!(
                        "VM {hostname} was not ready within {timeout:?}; it was deleted"
                    ))),
                };
                if let Err(e) = &result {
                    tracing::warn!("fork {hostname}: {}; deleting it", GuestText(e));
                    let _ = me.delete(&hostname, true).await;
                }
                result
            }
        };
        let child_status = if wait {
            finish.await?;
            ChildStatus::Running
        } else {
            tokio::spawn(finish);
            ChildStatus::Starting
        };
        Ok(Forked {
            hostname: rec.hostname.clone(),
            source_hostname: c.source_hostname.clone(),
            commit_id: c.commit_id.clone(),
            child: child_status,
            mode,
            persistent: rec.persistent,
            ip: super::VmAddr::of(&rec),
        })
    }
}

/// A fork request checked: what each of its forks is made from.
struct ForkPlan {
    group: crate::config::Group,
    /// Each fork's create, as its record is made from it.
    create: CreateNodeRequest,
    commit: CommitRecord,
    fixups: Vec<Fixup>,
    /// A live commit's capture.
    live: Option<Arc<slicer_vmm::Template>>,
    count: u32,
}

/// The fixups a request names (absent: all of them).
fn fixups(named: Option<&[String]>) -> Result<Vec<Fixup>, Error> {
    let Some(named) = named else {
        return Ok(Fixup::ALL.to_vec());
    };
    named
        .iter()
        .map(|f| {
            Fixup::parse(f).ok_or_else(|| {
                let all: Vec<&str> = Fixup::ALL.iter().map(|f| f.as_str()).collect();
                Error::invalid(format!("fixups: unknown {f:?}; use {}", all.join(", ")))
            })
        })
        .collect()
}

/// The builder's SSH host keys are not the fork's: they go, and the socket-activated sshd of
/// our images makes new ones on the first connection.
async fn forget_host_keys(vm: &dyn Machine) -> Result<(), NotReady> {
    let req = ExecRequest::argv([
        "/bin/sh",
        "-c",
        "rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub",
    ]);
    let removed = super::guest::exec_within(
        vm,
        "the removal of the SSH host keys",
        &req,
        None,
        super::GUEST_CALL_DEADLINE,
    )
    .await;
    match removed {
        Ok(o) if o.status.code == Some(0) => Ok(()),
        Ok(o) => Err(NotReady(format!(
            "removing the SSH host keys: exit {:?}",
            o.status.code
        ))),
        Err(e @ slicer_agent_client::AgentError::Deadline { .. }) => Err(NotReady(e.to_string())),
        // An image without /bin/sh has no sshd either.
        Err(e) => {
            tracing::debug!("removing the SSH host keys: {:#}", GuestText(&e));
            Ok(())
        }
    }
}

impl Manager {
    /// Exports the stopped VM's disk (its whole backing chain) as one standalone
    /// qcow2 file, written beside it and handed back open (already unlinked, so it goes with
    /// the answer however that ends).
    pub async fn export_disk(self: &Arc<Self>, hostname: &str) -> Result<(std::fs::File, u64), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let rec = me.record(&h)?;
            if me.vms().contains_key(&h) || rec.status != VmStatus::Stopped {
                return Err(Error::conflict(format!(
                    "VM {h} is {}: shut it down first, so that its disk is consistent",
                    rec.status.as_str().to_lowercase()
                )));
            }
            let disk = me.vm_dir(&h).join("disk.qcow2");
            if !disk.is_file() {
                return Err(Error::conflict(format!("VM {h} has no disk")));
            }
            let out = me
                .vm_dir(&h)
                .join(format!("export-{}.qcow2", hex::encode(rand::random::<[u8; 6]>())));
            let file = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&out)
                    .map_err(Error::host)?
            };
            let converted = me.host.export_disk(&disk, &file).await;
            let _ = std::fs::remove_file(&out);
            let opened = match converted {
                Ok(()) => Ok(file),
                Err(e) => Err(Error::host(HostCause::context(e, format!("exporting VM {h}'s disk")))),
            };
            let f = opened?;
            let len = f.metadata().map_err(Error::host)?.len();
            Ok((f, len))
        })
        .await
    }
}
