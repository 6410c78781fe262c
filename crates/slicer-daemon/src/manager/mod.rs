//! The VM manager: creates, tracks and removes VMs, keeping SQLite in step.
//!
//! It is the daemon's service: operations in, domain types out ([`VmInfo`], [`Created`],
//! [`Deleted`], [`Commit`], [`Forked`]; failures as [`Error`]). It knows nothing of HTTP: `api`
//! turns its answers into slicer-api's wire types, times into RFC 3339, errors into statuses.
//!
//! Every VM is started with a disk the VM library never removes (`persistent` at that
//! level); the manager decides when a disk goes: on delete, or when an ephemeral VM stops.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slicer_agent_client::GuestText;
use slicer_api::{CreateNodeRequest, NetworkMode, VmStatus};
use slicer_vmm::{ExecRequest, Host, Shape, VmSpec};
use tokio::sync::watch;

use crate::config::{human_bytes, Capacity, Group, Settings};
use crate::state::{Db, VmRecord};
pub use error::{Error, HostCause, HostFault};

mod backend;
mod boot;
mod capacity;
mod commits;
mod counters;
mod create;
mod error;
mod guest;
mod info;
mod lifecycle;
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
pub use commits::{valid_commit_id, Commit, CommitFilter, Forked};
use create::{BootPlan, LaunchPlan, NewVm};
use guest::*;
pub use info::{Created, Deleted, VmAddr, VmInfo};
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
pub type Ready = Option<Result<(), NotReady>>;

/// Why a VM did not become ready (or stopped while its caller waited), as its owner is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(pub String);

impl From<NotReady> for Error {
    fn from(e: NotReady) -> Error {
        Error::host_msg(e.0)
    }
}

/// A VM whose QEMU the manager started or adopted, with what follows its boot.
pub struct Running {
    pub vm: Box<dyn Machine>,
    pub group: String,
    net: Option<NetHandle>,
    /// vCPUs stopped through QMP (a pause).
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

/// The service the API calls: VM operations in, domain types out (see the module docs).
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
    /// Set by [`Manager::shutdown_all`]: no VM starts any more.
    closing: AtomicBool,
    /// Where commits keep their disks: `<data_dir>/commits/<id>/disk.qcow2`.
    commits_dir: PathBuf,
    /// The shapes that get a template (at most `settings.templates.shapes`; the warm host
    /// groups' own first): other shapes boot cold.
    template_shapes: Mutex<Vec<Shape>>,
    /// One commit change at a time (see `commits`).
    commit_lock: tokio::sync::Mutex<()>,
    /// Slicer Proxy's clients, secrets and rules, and the links to running proxies.
    proxy: Arc<crate::proxy::ProxyAdmin>,
}

/// The time now as the manager's records keep it (the state database, the secret store):
/// RFC 3339 in UTC. Answers format their times in `api`.
pub fn stamp() -> String {
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

/// What a create waits for before it answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wait {
    /// The guest agent answers (the VM is ready).
    Agent,
    /// Its userdata ran too.
    Userdata,
}

impl Manager {
    /// The daemon's manager: QEMU VMs on `host`, after checking that every host program it
    /// runs is installed.
    pub async fn new(settings: Settings, host: Host, data_dir: &std::path::Path) -> Result<Arc<Manager>, Error> {
        // Every host program the daemon runs, named with its package before anything starts.
        let mut tools = slicer_image::tools::RUNTIME_TOOLS.to_vec();
        if settings.groups.iter().any(|g| g.network_mode != NetworkMode::None) {
            tools.extend_from_slice(slicer_image::tools::NETWORK_TOOLS);
        }
        slicer_image::tools::require(&tools).map_err(Error::host)?;
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
    ) -> Result<Arc<Manager>, Error> {
        std::fs::create_dir_all(&host.vm_root).map_err(Error::host)?;
        let db = Db::open(&data_dir.join("state.db")).map_err(Error::host)?;
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
                    Some(r) => GroupNet::Isolated(slicer_net::Net::parse(r).ok_or_else(|| Error::host_msg("range"))?),
                    None => continue,
                },
                NetworkMode::Bridge => GroupNet::Bridge(
                    slicer_net::Bridge::new(&g.name, &g.bridge, &g.gateway, g.allow.clone(), g.drop.clone())
                        .map_err(Error::host)?,
                ),
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
        .map_err(|e| Error::host(HostCause::context(e, "opening the proxy state")))?;
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
            secrets: crate::secrets::SecretStore::open(data_dir).map_err(Error::host)?,
            secrets_lock: tokio::sync::Mutex::new(()),
            vms: Mutex::new(HashMap::new()),
            nets,
            alloc: tokio::sync::Mutex::new(()),
            ops: OpMap::default(),
            claims: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            commits_dir: data_dir.join("commits"),
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

    /// Slicer Proxy's control plane.
    pub fn proxy(&self) -> &Arc<crate::proxy::ProxyAdmin> {
        &self.proxy
    }

    /// The config's host group `name`.
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
}

/// The VM's name: the value of its `name=` tag.
pub fn vm_name(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix("name="))
}
