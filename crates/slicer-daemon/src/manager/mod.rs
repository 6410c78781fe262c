//! The VM manager: creates, tracks and removes VMs, keeping SQLite in step.
//!
//! Every VM is started with a disk the VM library never removes (`persistent` at that
//! level); the manager decides when a disk goes: on delete, or when an ephemeral VM stops.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use slicer_agent_client::GuestText;
use slicer_api::{CreateNodeRequest, CreateNodeResponse, DeleteResponse, NetworkMode, Node, VmStatus};
use slicer_vmm::{ExecRequest, Host, Shape, VmSpec};
use tokio::sync::watch;

use crate::config::{human_bytes, Capacity, Group, Settings};
use crate::state::{Db, VmRecord};
pub use error::{Error, HostCause, HostFault};

mod backend;
mod capacity;
mod commits;
mod error;
mod guest;
mod locks;
mod net;
mod recovery;
mod secrets;
mod templates;
#[cfg(test)]
mod unit;

pub use backend::{Backend, BoxFut, Machine, QemuBackend};
pub use guest::{Duplex, ExecStart, Guest, GuestInput, GuestStream, Process, Upload};

use capacity::Ledger;
pub use commits::{valid_commit_id, CommitFilter};
use guest::*;
use locks::OpMap;
pub use locks::VmOp;
pub use net::{GroupNet, NetHandle};
pub use secrets::{settle_pushes, SecretChange};

/// Longest a VM may take to answer its first health check.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest a VM restored from a template may take to answer before it is booted cold instead.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a guest gets to power off on `graceful_shutdown` or a shutdown request.
pub const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one secret change may take to reach one guest.
pub const SECRET_PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest each call the daemon makes into a guest for itself may take, start to end: the SSH
/// key installation, the userdata's upload and its helpers (who the default user is, the log's
/// tail), the removal of a fork's SSH host keys. The agent client bounds only the start of an
/// exec; a guest whose command never ends would otherwise hold the task (and whoever waits for
/// the VM to be ready) for ever.
pub const GUEST_CALL_DEADLINE: Duration = slicer_agent_client::CALL_DEADLINE;
/// Longest a VM's userdata may run. Past it the script is killed (the agent kills the process
/// group of an exec whose stream goes) and its exit code is recorded as 124, as `timeout(1)`
/// reports.
pub const USERDATA_DEADLINE: Duration = Duration::from_secs(3600);
/// The exit code recorded for a userdata that ran past [`USERDATA_DEADLINE`].
pub const USERDATA_TIMED_OUT: i32 = 124;

/// Boot progress of a VM: `None` while booting, then ready or the reason it failed.
pub type Ready = Option<Result<(), String>>;

pub struct Running {
    pub vm: Box<dyn Machine>,
    pub group: String,
    net: Option<NetHandle>,
    /// vCPUs stopped through QMP (`POST /vm/{h}/pause`).
    paused: AtomicBool,
    /// Set before an intentional stop, so the exit watcher does not treat it as a crash.
    stopping: AtomicBool,
    pub ready: watch::Receiver<Ready>,
    /// Exit code of userdata once it ran (`None` while it has not).
    pub userdata: watch::Receiver<Option<i32>>,
    /// The VM's secret queue: one push (or sync) at a time, in order.
    secrets_turn: tokio::sync::Mutex<()>,
    /// Secrets with a push waiting for its turn (it reads the store when its turn comes).
    secrets_pending: Mutex<HashSet<String>>,
}

impl Running {
    fn pending_secrets(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.secrets_pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Manager {
    settings: Settings,
    host: Arc<Host>,
    /// What starts VMs (QEMU in the daemon; a fake in unit tests).
    backend: Arc<dyn Backend>,
    db: Db,
    metrics: crate::metrics::Metrics,
    secrets: crate::secrets::SecretStore,
    /// Serializes changes to secrets.
    secrets_lock: tokio::sync::Mutex<()>,
    vms: Mutex<HashMap<String, Arc<Running>>>,
    nets: HashMap<String, GroupNet>,
    /// Serializes address allocation with the record's creation.
    alloc: tokio::sync::Mutex<()>,
    /// Per-VM operation locks (see [`VmOp`]).
    ops: OpMap,
    /// The capacity budget and what VMs hold of it.
    ledger: Mutex<Ledger>,
    /// Claims of new VMs that have no hostname yet.
    claims: AtomicU64,
    /// SSH keys of a create request, until the VM's first boot has installed them.
    pending_ssh_keys: Mutex<HashMap<String, Vec<String>>>,
    /// Set by [`Manager::shutdown_all`]: no VM starts any more.
    closing: AtomicBool,
    /// Where commits keep their disks: `<data_dir>/commits/<id>/disk.qcow2`.
    commits_dir: PathBuf,
    /// Forks whose first boot gives them a new machine id.
    fresh_ids: Mutex<HashSet<String>>,
    /// Forks of a live commit, by hostname, until launched: restored from its capture.
    live_forks: Mutex<HashMap<String, Arc<slicer_vmm::Template>>>,
    /// Live forks restored and not yet ready: their memory is their source's, secrets included,
    /// so their secrets are pruned to their own scope before they report ready.
    restored_from_live: Mutex<HashSet<String>>,
    /// The shapes that get a template (at most `settings.templates.shapes`; the warm host
    /// groups' own first): other shapes boot cold.
    template_shapes: Mutex<Vec<Shape>>,
    /// One commit change at a time (see `commits`).
    commit_lock: tokio::sync::Mutex<()>,
    /// Slicer Proxy's clients, secrets and rules, and the links to running proxies.
    proxy: Arc<crate::proxy::ProxyAdmin>,
    /// The login environment of proxy-bound VMs, until their first boot has written it.
    pending_proxy_env: Mutex<HashMap<String, String>>,
}

/// The answer to a create (or relaunch) of `rec`.
fn created(rec: &VmRecord) -> CreateNodeResponse {
    CreateNodeResponse {
        hostname: rec.hostname.clone(),
        hostgroup: rec.host_group.clone(),
        ip: rec.ip.clone(),
        created_at: rec.created_at.clone(),
        arch: slicer_api::VM_ARCH.into(),
        persistent: rec.persistent,
    }
}

/// A time given in ns since the Unix epoch (as guests report it), in RFC 3339; empty when out
/// of range.
pub fn rfc3339_ns(ns: i128) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// [`rfc3339_ns`] of a time in ms.
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339_ns(i128::from(ms) * 1_000_000)
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Runs a state change to its end even when the request that asked for it goes away (and its
/// future is dropped): a half-made or half-removed VM would be left behind otherwise.
async fn detached<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(change)
        .await
        .unwrap_or_else(|e| Err(Error::host_msg(format!("the VM operation failed: {e}"))))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wait {
    Agent,
    Userdata,
}

impl Manager {
    /// The daemon's manager: QEMU VMs on `host`, after checking that every host program it
    /// runs is installed.
    pub async fn new(settings: Settings, host: Host, data_dir: &std::path::Path) -> anyhow::Result<Arc<Manager>> {
        // Every host program the daemon runs, named with its package before anything starts.
        let mut tools = slicer_image::tools::RUNTIME_TOOLS.to_vec();
        if settings.groups.iter().any(|g| g.network_mode != NetworkMode::None) {
            tools.extend_from_slice(slicer_image::tools::NETWORK_TOOLS);
        }
        slicer_image::tools::require(&tools)?;
        let host = Arc::new(host);
        Manager::with_backend(settings, host.clone(), Arc::new(QemuBackend(host)), data_dir).await
    }

    /// A manager whose VMs come from `backend` (`host` gives where VM directories live and how
    /// they are jailed).
    pub async fn with_backend(
        settings: Settings,
        host: Arc<Host>,
        backend: Arc<dyn Backend>,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Arc<Manager>> {
        std::fs::create_dir_all(&host.vm_root)?;
        let db = Db::open(&data_dir.join("state.db"))?;
        // Address plan: explicit ranges and bridge subnets, then ranges derived from group
        // names that avoid the host's addresses, those and each other (and never hold the
        // metadata address's block).
        let networked = settings.groups.iter().any(|g| g.network_mode != NetworkMode::None);
        let host_addresses = match networked {
            true => slicer_net::host_addresses().await,
            false => Vec::new(),
        };
        let mut used: Vec<slicer_net::Net> = host_addresses
            .into_iter()
            .map(|addr| slicer_net::Net { addr, prefix: 32 })
            .collect();
        let mut nets = HashMap::new();
        for g in &settings.groups {
            let n = match g.network_mode {
                NetworkMode::Isolated => match &g.range {
                    Some(r) => GroupNet::Isolated(slicer_net::Net::parse(r).context("range")?),
                    None => continue,
                },
                NetworkMode::Bridge => GroupNet::Bridge(slicer_net::Bridge::new(
                    &g.name,
                    &g.bridge,
                    &g.gateway,
                    g.allow.clone(),
                    g.drop.clone(),
                )?),
                NetworkMode::None => continue,
            };
            used.push(match &n {
                GroupNet::Isolated(range) => *range,
                GroupNet::Bridge(b) => b.subnet,
            });
            nets.insert(g.name.clone(), n);
        }
        for g in &settings.groups {
            if g.network_mode == NetworkMode::Isolated && g.range.is_none() {
                let range = slicer_net::derived_range(&g.name, &used);
                used.push(range);
                nets.insert(g.name.clone(), GroupNet::Isolated(range));
            }
        }
        host.template_memory.set_limit(settings.templates.memory_bytes);
        let metrics = crate::metrics::Metrics::new();
        let mut vm_ranges: Vec<String> = nets
            .values()
            .map(|n| match n {
                GroupNet::Isolated(range) => range.to_string(),
                GroupNet::Bridge(b) => b.subnet.to_string(),
            })
            .collect();
        vm_ranges.sort();
        let proxy = crate::proxy::ProxyAdmin::open(
            &data_dir.join("state.db"),
            data_dir,
            settings.groups.iter().map(|g| g.name.clone()).collect(),
            vm_ranges,
            crate::proxy::ProxyMetrics::of(&metrics),
        )
        .context("opening the proxy state")?;
        let m = Arc::new(Manager {
            ledger: Mutex::new(Ledger::new(
                settings.capacity,
                settings.memory_accounting == crate::config::MemoryAccounting::Measured,
            )),
            settings,
            host,
            backend,
            db,
            metrics,
            proxy,
            pending_proxy_env: Mutex::new(HashMap::new()),
            secrets: crate::secrets::SecretStore::open(data_dir)?,
            secrets_lock: tokio::sync::Mutex::new(()),
            vms: Mutex::new(HashMap::new()),
            nets,
            alloc: tokio::sync::Mutex::new(()),
            ops: OpMap::default(),
            claims: AtomicU64::new(0),
            pending_ssh_keys: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            commits_dir: data_dir.join("commits"),
            fresh_ids: Mutex::new(HashSet::new()),
            live_forks: Mutex::new(HashMap::new()),
            restored_from_live: Mutex::new(HashSet::new()),
            template_shapes: Mutex::new(Vec::new()),
            commit_lock: tokio::sync::Mutex::new(()),
        });
        for shape in m.configured_shapes() {
            if !m.admit_shape(&shape) {
                tracing::warn!(
                    "host groups have more warm-start shapes than config.capacity.template_shapes ({}): VMs of {shape:?} boot cold",
                    m.settings.templates.shapes
                );
            }
        }
        Ok(m)
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a VM name (its `name=` tag): a lowercase DNS label that is no VM's hostname,
    /// not in a host group's `<group>-<n>` namespace and no other VM's name. `own` is the VM
    /// the name is for, when it exists.
    pub fn check_name(&self, name: &str, own: Option<&str>) -> Result<(), Error> {
        if !slicer_vmm::is_dns_label(name) {
            return Err(Error::invalid(format!(
                "name {name:?}: use a lowercase DNS label (a-z, 0-9 and '-', at most 63, not starting or ending with '-')"
            )));
        }
        for g in &self.settings.groups {
            let n = name.strip_prefix(&g.name).and_then(|r| r.strip_prefix('-'));
            if n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                return Err(Error::invalid(format!(
                    "name {name:?} looks like a hostname of host group {} ({}-<n>): choose another",
                    g.name, g.name
                )));
            }
        }
        let tag = format!("name={name}");
        for r in self.db.list().map_err(Error::host)? {
            if r.hostname == name {
                return Err(Error::conflict(format!("name {name:?} is the hostname of a VM")));
            }
            if Some(r.hostname.as_str()) != own && r.tags.contains(&tag) {
                return Err(Error::conflict(format!("name {name:?} is taken by VM {}", r.hostname)));
            }
        }
        Ok(())
    }

    fn proxy_env(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.pending_proxy_env.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Slicer Proxy's control plane.
    pub fn proxy(&self) -> &Arc<crate::proxy::ProxyAdmin> {
        &self.proxy
    }

    fn pending_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.pending_ssh_keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn group(&self, name: &str) -> Result<&Group, Error> {
        self.settings
            .groups
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| Error::not_found(format!("host group {name:?} not found")))
    }

    fn vm_dir(&self, hostname: &str) -> PathBuf {
        self.host.vm_root.join(hostname)
    }

    fn new_record(&self, g: &Group, req: &CreateNodeRequest) -> Result<VmRecord, Error> {
        let cpus = req.cpus.unwrap_or(g.cpus);
        if cpus == 0 || cpus > g.cpus {
            return Err(Error::invalid(format!(
                "cpus {cpus} is outside 1..={} allowed by host group {}",
                g.cpus, g.name
            )));
        }
        let ram_bytes = req.ram_bytes.unwrap_or(g.ram_bytes);
        if ram_bytes < 128 << 20 || ram_bytes > g.ram_bytes {
            return Err(Error::invalid(format!(
                "ram_bytes {ram_bytes} is outside 128 MiB..={} allowed by host group {}",
                g.ram_bytes, g.name
            )));
        }
        if req.gpu_count.unwrap_or(0) > 0 {
            return Err(Error::invalid("gpu_count: this host has no GPUs to pass through"));
        }
        // Fields of SlicerVM's create body this daemon cannot honour are refused, not ignored.
        if req.disk_image.as_deref().is_some_and(|d| !d.is_empty()) {
            return Err(Error::invalid(
                "disk_image: not supported; a VM's disk comes from its host group's image (the config's image)",
            ));
        }
        if req.ip.as_deref().is_some_and(|ip| !ip.is_empty()) {
            return Err(Error::invalid(
                "ip: addresses are allocated by the daemon (the lowest free one of the host group); leave ip out",
            ));
        }
        for t in &req.tags {
            if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
                return Err(Error::invalid(format!("invalid tag {t:?}: 1-256 printable characters")));
            }
        }
        if req.tags.len() > 64 {
            return Err(Error::invalid("at most 64 tags"));
        }
        if req.hostname.is_some() {
            return Err(Error::invalid("hostname: hostnames are allocated by the daemon"));
        }
        Ok(VmRecord {
            hostname: String::new(),
            host_group: g.name.clone(),
            cpus,
            ram_bytes,
            persistent: req.persistent.unwrap_or(g.persistent),
            protected: false,
            status: VmStatus::Running,
            created_at: now_rfc3339(),
            ip: String::new(),
            pid: None,
            image: g.image.clone(),
            storage_size: g.storage_size,
            userdata: req.userdata.clone().or_else(|| g.userdata.clone()),
            userdata_ran: false,
            userdata_exit_code: None,
            tags: req.tags.clone(),
            net_allow: None,
            net_drop: None,
            pid_start: None,
        })
    }

    /// `POST /hostgroup/{g}/nodes`.
    pub async fn create(
        self: &Arc<Self>,
        group: &str,
        req: CreateNodeRequest,
        wait: Option<Wait>,
        timeout: Duration,
    ) -> Result<CreateNodeResponse, Error> {
        let g = self.group(group)?.clone();
        let mut rec = self.new_record(&g, &req)?;
        if let Some(n) = &req.network {
            self.check_override(&g, n)?;
            rec.net_allow = n.allow.clone();
            rec.net_drop = n.drop.clone();
        }
        if let Some(names) = &req.secrets {
            if let Some(bad) = names.iter().find(|n| !crate::secrets::valid_name(n)) {
                return Err(Error::invalid(format!("secrets: {bad:?} is not a secret name")));
            }
        }
        if req.import_user.as_deref().is_some_and(|u| !u.is_empty()) {
            return Err(Error::invalid(
                "import_user: importing keys from GitHub is not supported (the daemon does not fetch keys from the internet); pass the public keys in ssh_keys",
            ));
        }
        crate::config::check_ssh_keys("ssh_keys", &req.ssh_keys).map_err(Error::invalid)?;
        if req.tags.iter().filter(|t| t.starts_with("name=")).count() > 1 {
            return Err(Error::invalid("tags: at most one name= tag"));
        }
        if let Some(name) = vm_name(&req.tags) {
            self.check_name(name, None)?;
        }
        let proxy = match &req.proxy {
            Some(p) => Some((p.client.clone(), self.proxy.check_binding(&g.name, &p.client)?)),
            None => None,
        };
        let me = self.clone();
        let (rec, running) = detached(async move {
            me.record_and_launch_bound(rec, req.secrets, req.ssh_keys, None, proxy)
                .await
        })
        .await?;
        if let Some(w) = wait {
            let waited = tokio::time::timeout(timeout, self.wait_for(&running, w)).await;
            let failure = match waited {
                Ok(Ok(())) => None,
                Ok(Err(msg)) => Some(Error::host_msg(msg)),
                Err(_) => Some(Error::timeout(format!(
                    "VM {} was not ready within {timeout:?}; it was deleted",
                    rec.hostname
                ))),
            };
            if let Some(err) = failure {
                let _ = self.delete(&rec.hostname, true).await;
                return Err(err);
            }
            if let Wait::Userdata = w {
                let code = (*running.userdata.borrow()).unwrap_or(0);
                if code != 0 {
                    // The VM stays, for its owner to look into (or delete): it booted, and
                    // what failed is the tenant's own script.
                    let tail = userdata_log_tail(running.vm.as_ref()).await;
                    return Err(Error::UserdataFailed(format!(
                        "VM {} was created, but its userdata exited with code {code}; the VM is kept \
                             (delete it with DELETE /hostgroup/{}/nodes/{}). Last lines of {USERDATA_LOG}:\n{tail}",
                        rec.hostname, rec.host_group, rec.hostname
                    )));
                }
            }
        }
        Ok(created(&rec))
    }

    /// The part of a create that runs to its end: takes the VM's share of the capacity budget
    /// (before anything exists), records the VM and starts it under its operation lock.
    async fn record_and_launch(
        self: &Arc<Self>,
        rec: VmRecord,
        secrets: Option<Vec<String>>,
        ssh_keys: Vec<String>,
        fork: Option<commits::ForkFrom>,
    ) -> Result<(VmRecord, Arc<Running>), Error> {
        self.record_and_launch_bound(rec, secrets, ssh_keys, fork, None).await
    }

    /// [`Manager::record_and_launch`] of a VM bound to a proxy (client, the proxy's host): a
    /// token of the client is minted for the VM once its record exists (it goes with the
    /// record), and its login environment written before it reports ready.
    async fn record_and_launch_bound(
        self: &Arc<Self>,
        mut rec: VmRecord,
        secrets: Option<Vec<String>>,
        ssh_keys: Vec<String>,
        fork: Option<commits::ForkFrom>,
        proxy: Option<(String, String)>,
    ) -> Result<(VmRecord, Arc<Running>), Error> {
        let claim = format!("#new-{}", self.claims.fetch_add(1, Ordering::Relaxed));
        self.reserve(&claim, &rec)?;
        if let Err(e) = self.allocate_and_record(&mut rec, None).await {
            self.release(&claim);
            return Err(match e.downcast::<Error>() {
                Ok(api) => api,
                Err(e) => Error::host(e),
            });
        }
        let hostname = rec.hostname.clone();
        self.move_share(&claim, &hostname);
        let _op = self.lock_vm(&hostname).await;
        // A delete may have come first: it removed the record and released the share.
        match self.db.get(&hostname) {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.release(&hostname);
                return Err(Error::conflict(format!(
                    "VM {hostname} was deleted while it was being created"
                )));
            }
            Err(e) => {
                self.abandon(&hostname);
                return Err(Error::host(e));
            }
        }
        let scoped = match &secrets {
            Some(names) => self.db.set_secret_scope(&hostname, names).map_err(Error::host),
            None => Ok(()),
        };
        let scoped = match (scoped, &proxy) {
            (Ok(()), Some((client, host))) => match self.proxy.mint_vm_token(client, &hostname).await {
                Ok(token) => {
                    self.proxy_env()
                        .insert(hostname.clone(), crate::proxy::proxy_env(host, &token));
                    Ok(())
                }
                Err(e) => Err(e),
            },
            (r, _) => r,
        };
        if !ssh_keys.is_empty() {
            self.pending_keys().insert(hostname.clone(), ssh_keys);
        }
        let prepared = match (scoped, &fork) {
            (Ok(()), Some(f)) => self.prepare_fork(&rec, f).await,
            (r, _) => r,
        };
        let launched = match prepared {
            Ok(()) => self.launch(&rec).await.map_err(Error::host),
            Err(e) => Err(e),
        };
        match launched {
            Ok(r) => Ok((rec, r)),
            Err(e) => {
                self.pending_keys().remove(&hostname);
                self.proxy_env().remove(&hostname);
                self.abandon(&hostname);
                Err(e)
            }
        }
    }

    /// Undoes a create that did not start: the record, the directory and the share go.
    fn abandon(&self, hostname: &str) {
        let _ = self.db.delete(hostname);
        let _ = std::fs::remove_dir_all(self.vm_dir(hostname));
        self.release(hostname);
    }

    async fn wait_for(&self, r: &Running, w: Wait) -> Result<(), String> {
        let mut ready = r.ready.clone();
        let state = ready
            .wait_for(|s| s.is_some())
            .await
            .map_err(|_| "VM stopped while booting".to_string())?
            .clone();
        state.unwrap_or(Ok(()))?;
        if let Wait::Userdata = w {
            let mut ud = r.userdata.clone();
            ud.wait_for(|s| s.is_some())
                .await
                .map_err(|_| "VM stopped while running userdata".to_string())?;
        }
        Ok(())
    }

    fn spec(&self, rec: &VmRecord) -> VmSpec {
        let g = self.settings.groups.iter().find(|g| g.name == rec.host_group);
        let mut spec = VmSpec::new(&rec.hostname, &rec.image);
        spec.cpus = rec.cpus;
        spec.memory_mib = (rec.ram_bytes >> 20) as u32;
        spec.disk_size = rec.storage_size;
        spec.dns = g.map(|g| g.dns.clone()).unwrap_or_default();
        // The manager decides when a disk is removed.
        spec.persistent = true;
        spec.boot_timeout = BOOT_TIMEOUT;
        spec
    }

    /// Starts the VM of a record, and the tasks that follow its boot and its exit. A new VM
    /// of a warm-starting group is restored from its template; any other start boots its disk.
    async fn launch(self: &Arc<Self>, rec: &VmRecord) -> anyhow::Result<Arc<Running>> {
        anyhow::ensure!(!self.closing.load(Ordering::SeqCst), "the daemon is stopping");
        let mut spec = self.spec(rec);
        spec.new_identity = self
            .fresh_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.hostname);
        let (net, vmnet) = match self.setup_net(rec).await? {
            Some((h, n)) => (Some(h), Some(n)),
            None => (None, None),
        };
        spec.net = vmnet;
        let live = self
            .live_forks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.hostname);
        let fresh = !self.vm_dir(&rec.hostname).exists();
        let started = match live {
            // A live fork continues its commit's guest; booting its disk cold instead would
            // lose what the commit holds, so it fails instead.
            Some(capture) => {
                self.restored_from_live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(rec.hostname.clone());
                self.restore_ready(&spec, &capture).await
            }
            None => {
                let warm = match fresh && self.warm(&rec.host_group) {
                    true => self.start_warm(&spec).await,
                    false => None,
                };
                match warm {
                    Some(vm) => Ok(vm),
                    None => self.backend.start(&spec).await.map_err(anyhow::Error::from),
                }
            }
        };
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                self.restored_from_live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&rec.hostname);
                if let Some(n) = &net {
                    n.teardown().await;
                }
                self.count_launch(&rec.host_group, None);
                return Err(e);
            }
        };
        self.count_launch(&rec.host_group, Some(vm.start_mode()));
        self.db.set_status(&rec.hostname, VmStatus::Running, vm.process())?;
        Ok(self.track(rec, vm, net, false))
    }

    /// Counts a VM start (`None`: it failed).
    fn count_launch(&self, group: &str, mode: Option<slicer_vmm::StartMode>) {
        match mode {
            Some(m) => {
                self.metrics
                    .launches
                    .get_or_create(&crate::metrics::LaunchLabels {
                        group: group.to_string(),
                        mode: m.as_str().to_string(),
                    })
                    .inc();
            }
            None => {
                self.metrics
                    .launch_failures
                    .get_or_create(&crate::metrics::GroupLabels {
                        group: group.to_string(),
                    })
                    .inc();
            }
        }
    }

    /// The `/metrics` text, with the running VMs of each group counted now.
    pub fn metrics_text(&self) -> String {
        let running: Vec<(String, bool)> = self
            .vms()
            .values()
            .map(|r| (r.group.clone(), r.vm.is_running()))
            .collect();
        for g in &self.settings.groups {
            let n = running.iter().filter(|(group, up)| *up && group == &g.name).count();
            self.metrics
                .running
                .get_or_create(&crate::metrics::GroupLabels { group: g.name.clone() })
                .set(n as i64);
        }
        let templates = self.template_memory();
        let (held, budget) = self.capacity();
        self.metrics.set_capacity(&held, &budget);
        self.metrics.set_templates(&templates, self.template_shape_count());
        self.metrics.encode()
    }

    /// Registers a started or adopted VM and the tasks that follow its boot and its exit.
    fn track(
        self: &Arc<Self>,
        rec: &VmRecord,
        vm: Box<dyn Machine>,
        net: Option<NetHandle>,
        paused: bool,
    ) -> Arc<Running> {
        let (ready_tx, ready_rx) = watch::channel(None);
        let (ud_tx, ud_rx) = watch::channel(if rec.userdata.is_none() || rec.userdata_ran {
            Some(rec.userdata_exit_code.unwrap_or(0))
        } else {
            None
        });
        let running = Arc::new(Running {
            vm,
            group: rec.host_group.clone(),
            net,
            paused: AtomicBool::new(paused),
            stopping: AtomicBool::new(false),
            ready: ready_rx,
            userdata: ud_rx,
            secrets_turn: tokio::sync::Mutex::new(()),
            secrets_pending: Mutex::new(HashSet::new()),
        });
        self.vms().insert(rec.hostname.clone(), running.clone());

        let (me, r, hostname) = (self.clone(), running.clone(), rec.hostname.clone());
        let userdata = if rec.userdata_ran { None } else { rec.userdata.clone() };
        let ca_bundle = self
            .settings
            .groups
            .iter()
            .find(|g| g.name == rec.host_group)
            .and_then(Group::ca_bundle);
        tokio::spawn(async move {
            // Taken whatever happens, so that a VM that never boots leaves nothing behind.
            let request_keys = me.pending_keys().remove(&hostname).unwrap_or_default();
            let proxy_env = me.proxy_env().remove(&hostname);
            let mut result = if r.paused.load(Ordering::SeqCst) || r.vm.is_ready() {
                Ok(())
            } else {
                r.vm.wait_ready(BOOT_TIMEOUT).await.map_err(|e| format!("{e:#}"))
            };
            // The group's CAs, before the VM reports ready, on every start (the agent keeps
            // what a guest has). A new guest that cannot take them fails its start; an
            // adopted one (the daemon restarted) keeps running with a warning.
            if let (Ok(()), Some(pem), false) = (&result, &ca_bundle, r.paused.load(Ordering::SeqCst)) {
                if let Err(e) = install_ca(r.vm.as_ref(), pem).await {
                    let e = GuestText(&e);
                    if r.vm.start_mode() == slicer_vmm::StartMode::Adopted {
                        tracing::warn!("VM {hostname}: installing the host group's CA certificates: {e:#}");
                    } else {
                        result = Err(format!(
                            "installing the host group's CA certificates (host_groups[].ca) in the guest: {e:#}"
                        ));
                    }
                }
            }
            // A proxy-bound VM is not ready until its environment names the proxy.
            if let (Ok(()), Some(env)) = (&result, proxy_env) {
                if let Err(e) = write_proxy_env(r.vm.as_ref(), &env).await {
                    result = Err(format!("writing the proxy environment: {:#}", GuestText(&e)));
                }
            }
            let ok = result.is_ok();
            if ok && r.vm.is_ready() && r.vm.start_mode() != slicer_vmm::StartMode::Adopted {
                me.metrics
                    .ready_seconds
                    .get_or_create(&crate::metrics::ModeLabels {
                        mode: r.vm.start_mode().as_str().to_string(),
                    })
                    .observe(r.vm.boot_time().as_secs_f64());
            }
            if ok && r.vm.start_mode() != slicer_vmm::StartMode::Adopted {
                // Before userdata, so that it can use them. A guest that continues from
                // saved memory holding secrets (a resume; a live fork, whose memory is its
                // source's) keeps files its scope may not allow: pruned before it reports
                // ready. A cold boot starts with an empty /run, and a template's guest never
                // had any (pruning it would cost every warm create an agent round trip).
                let live = me
                    .restored_from_live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&hostname);
                let prune = live || r.vm.start_mode() == slicer_vmm::StartMode::Resume;
                if let Err(e) = me.sync_secrets(&hostname, &r, prune).await {
                    tracing::warn!("VM {hostname}: syncing secrets: {:#}", GuestText(&e));
                }
                let mut keys = me.settings.ssh_keys.clone();
                keys.extend(request_keys);
                if !keys.is_empty() {
                    if let Err(e) = authorize_ssh_keys(r.vm.as_ref(), &keys).await {
                        tracing::warn!("VM {hostname}: installing SSH keys: {:#}", GuestText(&e));
                    }
                }
            }
            let _ = ready_tx.send(Some(result));
            if let (true, Some(script)) = (ok, userdata) {
                let code = run_userdata(r.vm.as_ref(), &script).await;
                let _ = me.db.set_userdata_result(&hostname, code);
                let _ = ud_tx.send(Some(code));
            }
        });

        let (me, r, hostname) = (self.clone(), running.clone(), rec.hostname.clone());
        tokio::spawn(async move {
            r.vm.wait_exit().await;
            if r.stopping.load(Ordering::SeqCst) {
                return;
            }
            // An operation in progress (delete, relaunch, …) goes first; one that stopped or
            // replaced this VM set `stopping` and cleaned up after it.
            let _op = me.lock_vm(&hostname).await;
            if r.stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::warn!("VM {hostname} exited unexpectedly");
            me.reap(&hostname, &r).await;
        });
        running
    }

    /// After a VM stopped: its files, network objects and share of the capacity budget go;
    /// ephemeral VMs vanish, persistent ones become Stopped. Callers hold the VM's lock.
    async fn reap(&self, hostname: &str, r: &Arc<Running>) {
        r.vm.cleanup();
        if let Some(n) = &r.net {
            n.teardown().await;
        }
        self.forget(hostname, r);
        self.release(hostname);
        self.settle_record(hostname);
    }

    /// Under the VM's lock: a VM whose QEMU exited but whose exit watcher has not reaped it
    /// yet is reaped now, so that what starts next does not share (and then lose) its network
    /// objects.
    async fn reap_exited(&self, hostname: &str) {
        let exited = self.vms().get(hostname).filter(|r| !r.vm.is_running()).cloned();
        if let Some(r) = exited {
            r.stopping.store(true, Ordering::SeqCst);
            self.reap(hostname, &r).await;
        }
    }

    /// Removes `r` from the running VMs if it is still the one there.
    fn forget(&self, hostname: &str, r: &Arc<Running>) {
        let mut vms = self.vms();
        if vms.get(hostname).is_some_and(|cur| Arc::ptr_eq(cur, r)) {
            vms.remove(hostname);
        }
    }

    /// The record of a VM that stopped: ephemeral VMs vanish, persistent ones become Stopped.
    fn settle_record(&self, hostname: &str) {
        match self.db.get(hostname) {
            Ok(Some(rec)) if rec.persistent || rec.protected => {
                let _ = self.db.set_status(hostname, VmStatus::Stopped, None);
            }
            Ok(Some(_)) => {
                let _ = std::fs::remove_dir_all(self.vm_dir(hostname));
                let _ = self.db.delete(hostname);
            }
            _ => {}
        }
    }

    /// Every VM's record.
    pub fn records(&self) -> Result<Vec<VmRecord>, Error> {
        self.db.list().map_err(Error::host)
    }

    /// The host groups of the config.
    pub fn groups(&self) -> &[Group] {
        &self.settings.groups
    }

    /// The last commit made of a VM and the commit it was forked from.
    pub fn lineage(&self, hostname: &str) -> Result<(Option<String>, Option<String>), Error> {
        self.db.lineage(hostname).map_err(Error::host)
    }

    /// Replaces a VM's tags (checked by the caller: their form and the name).
    pub fn set_tags(&self, hostname: &str, tags: &[String]) -> Result<(), Error> {
        self.db.set_tags(hostname, tags).map_err(Error::host)
    }

    /// The accelerator VMs of `image` run with on this host (resolved once per host).
    pub async fn accelerator(&self, image: &str) -> anyhow::Result<slicer_hypervisor::Accel> {
        let kernel = self.host.images.get(image)?.kernel;
        Ok(self.host.accel(&kernel).await?)
    }

    /// Where a VM's serial console is logged (rotated to `console.log.1`).
    pub fn console_log(&self, hostname: &str) -> PathBuf {
        self.vm_dir(hostname).join("console.log")
    }

    /// Counts and times one API request by its route template.
    pub fn count_request(&self, method: String, route: String, status: u16, seconds: f64) {
        self.metrics
            .request_seconds
            .get_or_create(&crate::metrics::RouteLabels {
                method: method.clone(),
                route: route.clone(),
            })
            .observe(seconds);
        self.metrics
            .requests
            .get_or_create(&crate::metrics::RequestLabels { method, route, status })
            .inc();
    }

    pub fn record(&self, hostname: &str) -> Result<VmRecord, Error> {
        self.db
            .get(hostname)
            .map_err(Error::host)?
            .ok_or_else(|| Error::not_found(format!("VM {hostname:?} not found")))
    }

    pub fn node(&self, rec: &VmRecord) -> Node {
        let status = match self.vms().get(&rec.hostname) {
            Some(r) if r.vm.is_running() && r.paused.load(Ordering::SeqCst) => VmStatus::Paused,
            Some(r) if r.vm.is_running() => VmStatus::Running,
            _ if rec.status == VmStatus::Suspended => VmStatus::Suspended,
            _ => VmStatus::Stopped,
        };
        Node {
            hostname: rec.hostname.clone(),
            hostgroup: rec.host_group.clone(),
            ip: rec.ip.split('/').next().unwrap_or_default().to_string(),
            ram_bytes: rec.ram_bytes,
            cpus: rec.cpus,
            created_at: rec.created_at.clone(),
            arch: slicer_api::VM_ARCH.into(),
            tags: rec.tags.clone(),
            status,
            persistent: rec.persistent,
        }
    }

    pub fn list(&self, group: Option<&str>) -> Result<Vec<Node>, Error> {
        let recs = self.db.list().map_err(Error::host)?;
        Ok(recs
            .iter()
            .filter(|r| group.is_none_or(|g| r.host_group == g))
            .map(|r| self.node(r))
            .collect())
    }

    /// The running VM of `hostname`: 404 if unknown, 409 if it is not running.
    pub fn running(&self, hostname: &str) -> Result<Arc<Running>, Error> {
        if let Some(r) = self.vms().get(hostname) {
            if r.vm.is_running() {
                return Ok(r.clone());
            }
        }
        self.record(hostname)?;
        Err(Error::conflict(format!("VM {hostname} is not running")))
    }

    /// The running, unpaused VM of `hostname`, for guest operations: 409 when paused.
    pub fn active(&self, hostname: &str) -> Result<Arc<Running>, Error> {
        let r = self.running(hostname)?;
        if r.paused.load(Ordering::SeqCst) {
            return Err(Error::conflict(format!("VM {hostname} is paused: resume it first")));
        }
        Ok(r)
    }

    /// `POST /vm/{h}/pause` and `/resume`: QMP stop and cont. A resumed VM gets its secrets
    /// again: changes made while it was paused passed it by.
    pub async fn set_paused(self: &Arc<Self>, hostname: &str, pause: bool) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let r = me.running(&h)?;
            r.vm.set_paused(pause).await.map_err(Error::host)?;
            let was_paused = r.paused.swap(pause, Ordering::SeqCst);
            let status = if pause { VmStatus::Paused } else { VmStatus::Running };
            me.db.set_status(&h, status, r.vm.process()).map_err(Error::host)?;
            if was_paused && !pause {
                me.resync_secrets(&h, &r);
            }
            Ok(())
        })
        .await
    }

    /// `POST /vm/{h}/suspend`: saves the VM's memory and devices beside its disk and ends its
    /// QEMU; the record stays (status Suspended) until it is restored or deleted. A suspended
    /// VM holds no share of the capacity budget.
    pub async fn suspend(self: &Arc<Self>, hostname: &str) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let r = me.running(&h)?;
            r.stopping.store(true, Ordering::SeqCst);
            if let Err(e) = r.vm.suspend().await {
                if r.vm.is_running() {
                    r.stopping.store(false, Ordering::SeqCst);
                } else {
                    // Its exit watcher saw `stopping` and left it to us.
                    me.reap(&h, &r).await;
                }
                return Err(Error::host(e));
            }
            me.forget(&h, &r);
            if let Some(n) = &r.net {
                n.teardown().await;
            }
            me.release(&h);
            me.db.set_status(&h, VmStatus::Suspended, None).map_err(Error::host)?;
            Ok(())
        })
        .await
    }

    /// `POST /vm/{h}/restore`: continues a suspended VM where it was, with its network set up
    /// again; with `wait`, answers once its agent does (or after `timeout`).
    pub async fn restore(self: &Arc<Self>, hostname: &str, wait: bool, timeout: Duration) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        let r = detached(async move { me.restore_locked(&h).await }).await?;
        if wait {
            match tokio::time::timeout(timeout, self.wait_for(&r, Wait::Agent)).await {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => return Err(Error::host_msg(msg)),
                Err(_) => {
                    return Err(Error::timeout(format!(
                        "VM {hostname} did not answer within {timeout:?} of its restore"
                    )))
                }
            }
        }
        Ok(())
    }

    /// [`Manager::restore`] up to the start of QEMU, under the VM's operation lock.
    async fn restore_locked(self: &Arc<Self>, hostname: &str) -> Result<Arc<Running>, Error> {
        let _op = self.lock_vm(hostname).await;
        let rec = self.record(hostname)?;
        if self.running(hostname).is_ok() {
            return Err(Error::conflict(format!("VM {hostname} is running")));
        }
        if rec.status != VmStatus::Suspended {
            return Err(Error::conflict(format!(
                "VM {hostname} is not suspended (status {}); suspend it first",
                rec.status
            )));
        }
        self.reserve(hostname, &rec)?;
        let resumed = self.resume_vm(&rec).await;
        if resumed.is_err() {
            self.release(hostname);
        }
        resumed
    }

    /// Starts a suspended VM from its saved state, with its network set up again.
    async fn resume_vm(self: &Arc<Self>, rec: &VmRecord) -> Result<Arc<Running>, Error> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::unavailable("the daemon is stopping"));
        }
        let mut spec = self.spec(rec);
        let net = match self.setup_net(rec).await.map_err(Error::host)? {
            Some((h, n)) => {
                spec.net = Some(n);
                Some(h)
            }
            None => None,
        };
        let recorded = match self.backend.resume(&spec).await {
            Ok(vm) => self
                .db
                .set_status(&rec.hostname, VmStatus::Running, vm.process())
                .map(|()| vm),
            Err(e) => Err(e.into()),
        };
        let vm = match recorded {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(n) = &net {
                    n.teardown().await;
                }
                return Err(Error::host(e));
            }
        };
        self.count_launch(&rec.host_group, Some(vm.start_mode()));
        Ok(self.track(rec, vm, net, false))
    }

    /// How the running VM started.
    pub fn start_mode(&self, hostname: &str) -> Option<slicer_api::StartMode> {
        self.vms().get(hostname).map(|r| match r.vm.start_mode() {
            slicer_vmm::StartMode::Cold => slicer_api::StartMode::Cold,
            slicer_vmm::StartMode::Template => slicer_api::StartMode::Template,
            slicer_vmm::StartMode::Resume => slicer_api::StartMode::Resume,
            slicer_vmm::StartMode::Adopted => slicer_api::StartMode::Adopted,
        })
    }

    /// `POST /vm/{h}/relaunch`: boots a stopped persistent VM again from its disk. Of two at
    /// once, the second finds it running (409).
    pub async fn relaunch(self: &Arc<Self>, hostname: &str) -> Result<CreateNodeResponse, Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        let (rec, r) = detached(async move {
            let _op = me.lock_vm(&h).await;
            let rec = me.record(&h)?;
            if me.running(&h).is_ok() {
                return Err(Error::conflict(format!("VM {h} is running")));
            }
            if rec.status == VmStatus::Suspended {
                return Err(Error::conflict(format!(
                    "VM {h} is suspended: restore it (POST /vm/{h}/restore) or delete it"
                )));
            }
            if !rec.persistent && !rec.protected {
                return Err(Error::invalid(format!("VM {h} is not persistent")));
            }
            me.reap_exited(&h).await;
            me.reserve(&h, &rec)?;
            match me.launch(&rec).await {
                Ok(r) => Ok((rec, r)),
                Err(e) => {
                    me.release(&h);
                    Err(Error::host(e))
                }
            }
        })
        .await?;
        self.wait_for(&r, Wait::Agent).await.map_err(Error::host_msg)?;
        Ok(created(&rec))
    }

    /// Stops and removes a VM with its disk. `force` skips the protection of count VMs. Waits
    /// for an operation in progress on the VM (a launch) and then removes what it made.
    pub async fn delete(self: &Arc<Self>, hostname: &str, force: bool) -> Result<DeleteResponse, Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move { me.delete_locked(&h, force).await }).await
    }

    async fn delete_locked(&self, hostname: &str, force: bool) -> Result<DeleteResponse, Error> {
        let _op = self.lock_vm(hostname).await;
        let rec = self.record(hostname)?;
        if rec.protected && !force {
            return Err(Error::forbidden(format!(
                "VM {hostname} belongs to the config's count for host group {}; change the config instead",
                rec.host_group
            )));
        }
        let running = self.vms().remove(hostname);
        if let Some(r) = running {
            r.stopping.store(true, Ordering::SeqCst);
            let _ = r.vm.stop(Duration::ZERO).await;
            if let Some(n) = &r.net {
                n.teardown().await;
            }
        }
        self.release(hostname);
        let dir = self.vm_dir(hostname);
        let disk_removed = match std::fs::remove_dir_all(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!("removing {}: {e}", dir.display());
                false
            }
        };
        self.db.delete(hostname).map_err(Error::host)?;
        Ok(DeleteResponse {
            message: "VM deleted successfully".into(),
            disk_removed: disk_removed.to_string(),
            error: String::new(),
        })
    }

    /// `POST /vm/{h}/shutdown`: power off (ephemeral VMs are then removed) or reboot. A reboot
    /// keeps the VM's share of the capacity budget.
    pub async fn shutdown(self: &Arc<Self>, hostname: &str, reboot: bool) -> Result<(), Error> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let r = me.running(&h)?;
            r.stopping.store(true, Ordering::SeqCst);
            r.vm.stop_process(GRACEFUL_TIMEOUT).await;
            if !reboot {
                me.reap(&h, &r).await;
                return Ok(());
            }
            me.forget(&h, &r);
            r.vm.cleanup();
            if let Some(n) = &r.net {
                n.teardown().await;
            }
            let relaunched = match me.record(&h) {
                Ok(rec) => me.launch(&rec).await.map(drop).map_err(Error::host),
                Err(e) => Err(e),
            };
            if relaunched.is_err() {
                me.release(&h);
                me.settle_record(&h);
            }
            relaunched
        })
        .await
    }

    /// Daemon stop: guests power off (bounded) or stop at once, per `graceful_shutdown`.
    /// Ephemeral VMs are removed; persistent ones are kept as Stopped. Operations in progress
    /// finish first; no VM starts afterwards.
    pub async fn shutdown_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.proxy.stop();
        let mut names: HashSet<String> = self.vms().keys().cloned().collect();
        names.extend(self.op_map().keys().cloned());
        let graceful = if self.settings.graceful_shutdown {
            GRACEFUL_TIMEOUT
        } else {
            Duration::ZERO
        };
        let stops = names.iter().map(|h| async move {
            let _op = self.lock_vm(h).await;
            let running = self.vms().remove(h);
            if let Some(r) = running {
                r.stopping.store(true, Ordering::SeqCst);
                let _ = r.vm.stop(graceful).await;
                self.reap(h, &r).await;
            }
        });
        futures_util::future::join_all(stops).await;
        self.teardown_networks().await;
    }
}

/// The VM's name: the value of its `name=` tag.
pub fn vm_name(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix("name="))
}
