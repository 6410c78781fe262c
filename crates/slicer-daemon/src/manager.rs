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
use slicer_api::{
    CreateNodeRequest, CreateNodeResponse, DeleteResponse, Node, STATUS_RUNNING, STATUS_STOPPED, STATUS_SUSPENDED,
};
use slicer_vmm::{ExecRequest, Host, Shape, Vm, VmSpec};
use tokio::sync::watch;

use crate::config::{human_bytes, Capacity, Group, Settings};
use crate::error::ApiErr;
use crate::state::{Db, VmRecord};

mod commits;
pub use commits::{valid_commit_id, CommitFilter};

/// Longest a VM may take to answer its first health check.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest a VM restored from a template may take to answer before it is booted cold instead.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a guest gets to power off on `graceful_shutdown` or a shutdown request.
pub const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one secret change may take to reach one guest.
pub const SECRET_PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Boot progress of a VM: `None` while booting, then ready or the reason it failed.
pub type Ready = Option<Result<(), String>>;

/// What a VM's network consists of on the host, to undo when it stops.
pub enum NetHandle {
    Isolated(slicer_net::Isolated),
    Tap(String),
}

impl NetHandle {
    async fn teardown(&self) {
        match self {
            NetHandle::Isolated(i) => i.teardown().await,
            NetHandle::Tap(t) => slicer_net::Bridge::del_tap(t).await,
        }
    }
}

/// Where a host group's VMs get their addresses.
#[derive(Debug, Clone)]
pub enum GroupNet {
    /// One /30 per VM from this range.
    Isolated(slicer_net::Net),
    Bridge(slicer_net::Bridge),
}

pub struct Running {
    pub vm: Vm,
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
    pub settings: Settings,
    pub host: Host,
    pub db: Db,
    pub metrics: crate::metrics::Metrics,
    pub secrets: crate::secrets::SecretStore,
    /// Serializes changes to secrets.
    pub secrets_lock: tokio::sync::Mutex<()>,
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
    /// Live commits' captures in use, by commit id (their memory is read once per daemon).
    captures: Mutex<HashMap<String, Arc<slicer_vmm::Template>>>,
    /// One commit change at a time (see `commits`).
    commit_lock: tokio::sync::Mutex<()>,
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

fn pid_is_our_qemu(pid: u32, hostname: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        slicer_hypervisor::qemu::args_name(&args, &format!("slicer-{hostname}"), false)
    })
}

/// Every QEMU whose `-name` is this VM's.
fn qemus_named(hostname: &str) -> Vec<u32> {
    let name = format!("slicer-{hostname}");
    slicer_hypervisor::qemu::processes_where(|args| slicer_hypervisor::qemu::args_name(args, &name, false))
}

/// Per-VM operation locks by hostname; an entry lives while someone holds or waits for it.
type OpMap = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// One VM's operation lock, held: create (up to its launch), delete, relaunch, suspend,
/// restore, pause, resume, shutdown and the reaping of an exited VM run one at a time per VM.
pub struct VmOp {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    ops: OpMap,
}

impl Drop for VmOp {
    fn drop(&mut self) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        self.guard.take();
        // Locks nobody holds or waits for go (also one left by a waiter that gave up).
        ops.retain(|_, l| Arc::strong_count(l) > 1);
    }
}

/// What a running (or starting) VM holds of the host's capacity budget.
#[derive(Debug, Clone, Copy)]
struct Hold {
    /// Guest RAM.
    ram: u64,
    /// Guest RAM plus QEMU's overhead: what the VM's cgroup allows it.
    host_ram: u64,
    vcpus: u32,
    /// Host memory its cgroup was last charged (see [`Manager::account_memory`]).
    measured: Option<u64>,
}

impl Hold {
    fn of(rec: &VmRecord) -> Hold {
        Hold {
            ram: rec.ram_bytes,
            host_ram: rec.ram_bytes + slicer_vmm::vm_overhead_bytes(rec.ram_bytes),
            vcpus: rec.cpus,
            measured: None,
        }
    }
}

/// The capacity budget and what running and starting VMs hold of it, by hostname (or by a
/// claim while a new VM has no hostname yet).
struct Ledger {
    budget: Capacity,
    /// Running VMs count by the memory they were last measured to use (else nominally).
    measured: bool,
    holds: HashMap<String, Hold>,
}

impl Ledger {
    fn new(budget: Capacity, measured: bool) -> Ledger {
        Ledger {
            budget,
            measured,
            holds: HashMap::new(),
        }
    }

    /// What is held now, except by `but`.
    fn held(&self, but: Option<&str>) -> Capacity {
        let mut c = Capacity {
            ram_bytes: 0,
            vms: 0,
            vcpus: 0,
        };
        for (_, h) in self.holds.iter().filter(|(k, _)| Some(k.as_str()) != but) {
            c.ram_bytes += match (self.measured, h.measured) {
                // Never more than its cgroup allows.
                (true, Some(m)) => m.min(h.host_ram),
                _ => h.host_ram,
            };
            c.vms += 1;
            c.vcpus += h.vcpus;
        }
        c
    }

    /// Takes `hold` for `key` when it fits every budget; else says what is short.
    fn reserve(&mut self, key: &str, hold: Hold) -> Result<(), String> {
        let used = self.held(Some(key));
        let b = self.budget;
        if used.vms >= b.vms {
            return Err(format!(
                "host capacity: no room for another VM: {} VMs are running or starting, the budget is {}",
                used.vms, b.vms
            ));
        }
        let free_ram = b.ram_bytes.saturating_sub(used.ram_bytes);
        if hold.host_ram > free_ram {
            return Err(format!(
                "host capacity: {} of RAM requested ({} for the guest, {} for QEMU), {} free of a {} budget",
                human_bytes(hold.host_ram),
                human_bytes(hold.ram),
                human_bytes(hold.host_ram - hold.ram),
                human_bytes(free_ram),
                human_bytes(b.ram_bytes)
            ));
        }
        let free_vcpus = b.vcpus.saturating_sub(used.vcpus);
        if hold.vcpus > free_vcpus {
            return Err(format!(
                "host capacity: {} vCPUs requested, {free_vcpus} free of a budget of {}",
                hold.vcpus, b.vcpus
            ));
        }
        self.holds.insert(key.to_string(), hold);
        Ok(())
    }
}

/// Runs a state change to its end even when the request that asked for it goes away (and its
/// future is dropped): a half-made or half-removed VM would be left behind otherwise.
async fn detached<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, ApiErr>> + Send + 'static,
) -> Result<T, ApiErr> {
    tokio::spawn(change)
        .await
        .unwrap_or_else(|e| Err(ApiErr::internal(format!("the VM operation failed: {e}"))))
}

/// Waits up to `max` for secret pushes started by [`Manager::spread_secret`]; they go on
/// afterwards.
pub async fn settle_pushes(pushes: Vec<tokio::task::JoinHandle<()>>, max: Duration) {
    let _ = tokio::time::timeout(max, futures_util::future::join_all(pushes)).await;
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wait {
    Agent,
    Userdata,
}

impl Manager {
    pub async fn new(settings: Settings, host: Host, data_dir: &std::path::Path) -> anyhow::Result<Arc<Manager>> {
        // Every host program the daemon runs, named with its package before anything starts.
        let mut tools = slicer_image::tools::RUNTIME_TOOLS.to_vec();
        if settings.groups.iter().any(|g| g.network_mode != "none") {
            tools.extend_from_slice(slicer_image::tools::NETWORK_TOOLS);
        }
        slicer_image::tools::require(&tools)?;
        std::fs::create_dir_all(&host.vm_root)?;
        let db = Db::open(&data_dir.join("state.db"))?;
        // Address plan: explicit ranges and bridge subnets, then ranges derived from group
        // names that avoid the host's addresses, those and each other (and never hold the
        // metadata address's block).
        let mut used: Vec<slicer_net::Net> = slicer_net::host_addresses()
            .await
            .into_iter()
            .map(|addr| slicer_net::Net { addr, prefix: 32 })
            .collect();
        let mut nets = HashMap::new();
        for g in &settings.groups {
            let n = match g.network_mode.as_str() {
                "isolated" => match &g.range {
                    Some(r) => GroupNet::Isolated(slicer_net::Net::parse(r).context("range")?),
                    None => continue,
                },
                "bridge" => GroupNet::Bridge(slicer_net::Bridge::new(
                    &g.name,
                    &g.bridge,
                    &g.gateway,
                    g.allow.clone(),
                    g.drop.clone(),
                )?),
                _ => continue,
            };
            used.push(match &n {
                GroupNet::Isolated(range) => *range,
                GroupNet::Bridge(b) => b.subnet,
            });
            nets.insert(g.name.clone(), n);
        }
        for g in &settings.groups {
            if g.network_mode == "isolated" && g.range.is_none() {
                let range = slicer_net::derived_range(&g.name, &used);
                used.push(range);
                nets.insert(g.name.clone(), GroupNet::Isolated(range));
            }
        }
        Ok(Arc::new(Manager {
            ledger: Mutex::new(Ledger::new(
                settings.capacity,
                settings.memory_accounting == crate::config::MemoryAccounting::Measured,
            )),
            settings,
            host,
            db,
            metrics: crate::metrics::Metrics::new(),
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
            captures: Mutex::new(HashMap::new()),
            commit_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// The network plan of a group.
    pub fn group_net(&self, group: &str) -> Option<&GroupNet> {
        self.nets.get(group)
    }

    /// Picks the VM's address (the lowest free one of its group) and records the VM.
    async fn allocate_and_record(&self, rec: &mut VmRecord, fixed: Option<u32>) -> anyhow::Result<()> {
        let _guard = self.alloc.lock().await;
        // Again under the lock: two creates may have asked for the same name at once.
        if let Some(name) = vm_name(&rec.tags) {
            self.check_name(name, None)?;
        }
        let taken: Vec<std::net::Ipv4Addr> = self
            .db
            .list()?
            .iter()
            .filter(|r| r.host_group == rec.host_group)
            .filter_map(|r| r.ip.split('/').next()?.parse().ok())
            .collect();
        rec.ip = match self.nets.get(&rec.host_group) {
            Some(GroupNet::Isolated(range)) => {
                // The /30s in order, none inside 169.254.169.0/24 (the metadata address's).
                let subnet = slicer_net::vm_subnets(*range)
                    .find(|n| !taken.contains(&n.nth(2)))
                    .with_context(|| format!("no free /30 left in {range} for host group {}", rec.host_group))?;
                format!("{}/30", subnet.nth(2))
            }
            Some(GroupNet::Bridge(b)) => {
                let n = (1..(b.subnet.size() as u32 - 1))
                    .map(|i| b.subnet.nth(i))
                    .find(|a| *a != b.gateway && *a != slicer_net::METADATA_V4 && !taken.contains(a))
                    .with_context(|| {
                        format!("no free address left in {} for host group {}", b.subnet, rec.host_group)
                    })?;
                format!("{n}/{}", b.subnet.prefix)
            }
            None => String::new(),
        };
        self.db.create(rec, fixed)
    }

    /// Host-side network objects for a VM, and the spec's NIC.
    async fn setup_net(&self, rec: &VmRecord) -> anyhow::Result<Option<(NetHandle, slicer_vmm::VmNet)>> {
        let Some(ip) = rec
            .ip
            .split('/')
            .next()
            .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
        else {
            return Ok(None);
        };
        let mac = slicer_net::mac_for(&rec.hostname);
        match self.nets.get(&rec.host_group) {
            Some(GroupNet::Isolated(_)) => {
                let subnet = slicer_net::Net { addr: ip, prefix: 30 }.normalized();
                let (allow, drop) = self.effective_policy(rec);
                let iso = slicer_net::Isolated::new(&rec.hostname, subnet, allow, drop);
                iso.setup().await?;
                let net = slicer_vmm::VmNet {
                    netns: Some(iso.netns.clone()),
                    tap: iso.tap.clone(),
                    mac,
                    address: iso.guest_ip(),
                    prefix: 30,
                    gateway: iso.gateway(),
                };
                Ok(Some((NetHandle::Isolated(iso), net)))
            }
            Some(GroupNet::Bridge(b)) => {
                let g = self.group(&rec.host_group).map_err(|e| anyhow::anyhow!(e.message))?;
                let offset = u32::from(ip) - u32::from(b.subnet.addr);
                let tap = format!("{}{offset}", g.tap_prefix);
                anyhow::ensure!(
                    tap.len() <= slicer_net::IFNAMSIZ_MAX,
                    "TAP name {tap} is longer than 15 characters"
                );
                b.add_tap(&tap).await?;
                let net = slicer_vmm::VmNet {
                    netns: None,
                    tap: tap.clone(),
                    mac,
                    address: ip,
                    prefix: b.subnet.prefix,
                    gateway: b.gateway,
                };
                Ok(Some((NetHandle::Tap(tap), net)))
            }
            None => Ok(None),
        }
    }

    /// The allow and drop lists in force for a VM: its overrides, else its group's.
    pub fn effective_policy(&self, rec: &VmRecord) -> (Vec<String>, Vec<String>) {
        let g = self.settings.groups.iter().find(|g| g.name == rec.host_group);
        let allow = rec
            .net_allow
            .clone()
            .unwrap_or_else(|| g.map(|g| g.allow.clone()).unwrap_or_default());
        let drop = rec
            .net_drop
            .clone()
            .unwrap_or_else(|| g.map(|g| g.drop.clone()).unwrap_or_default());
        (allow, drop)
    }

    /// Network objects and cgroups for the daemon as a whole: leftovers of earlier runs go
    /// (only those named after this daemon's groups' VMs), group bridges come.
    pub async fn setup_networks(&self) -> anyhow::Result<()> {
        let taps: Vec<String> = self
            .settings
            .groups
            .iter()
            .filter(|g| g.network_mode == "bridge")
            .map(|g| g.tap_prefix.clone())
            .collect();
        let groups: Vec<String> = self.settings.groups.iter().map(|g| g.name.clone()).collect();
        // What adopted VMs use stays.
        let keep: Vec<String> = self
            .vms()
            .values()
            .filter_map(|r| r.net.as_ref())
            .flat_map(|n| match n {
                NetHandle::Isolated(i) => vec![i.netns.clone(), i.table.clone()],
                NetHandle::Tap(t) => vec![t.clone()],
            })
            .collect();
        slicer_net::remove_leftovers(&groups, &taps, &keep).await;
        if let Some(j) = &self.host.jail {
            let running: Vec<String> = self.vms().keys().cloned().collect();
            j.remove_leftover_cgroups(|name| {
                !running.iter().any(|r| r == name)
                    && groups.iter().any(|g| {
                        name.strip_prefix(g.as_str())
                            .and_then(|n| n.strip_prefix('-'))
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    })
            });
        }
        for n in self.nets.values() {
            if let GroupNet::Bridge(b) = n {
                b.setup().await?;
            }
        }
        Ok(())
    }

    async fn teardown_networks(&self) {
        for n in self.nets.values() {
            if let GroupNet::Bridge(b) = n {
                b.teardown().await;
            }
        }
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a VM name (its `name=` tag): a lowercase DNS label that is no VM's hostname,
    /// not in a host group's `<group>-<n>` namespace and no other VM's name. `own` is the VM
    /// the name is for, when it exists.
    pub fn check_name(&self, name: &str, own: Option<&str>) -> Result<(), ApiErr> {
        let label = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !label {
            return Err(ApiErr::bad_request(format!(
                "name {name:?}: use a lowercase DNS label (a-z, 0-9 and '-', at most 63, not starting or ending with '-')"
            )));
        }
        for g in &self.settings.groups {
            let n = name.strip_prefix(&g.name).and_then(|r| r.strip_prefix('-'));
            if n.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
                return Err(ApiErr::bad_request(format!(
                    "name {name:?} looks like a hostname of host group {} ({}-<n>): choose another",
                    g.name, g.name
                )));
            }
        }
        let tag = format!("name={name}");
        for r in self.db.list().map_err(ApiErr::internal)? {
            if r.hostname == name {
                return Err(ApiErr::conflict(format!("name {name:?} is the hostname of a VM")));
            }
            if Some(r.hostname.as_str()) != own && r.tags.contains(&tag) {
                return Err(ApiErr::conflict(format!("name {name:?} is taken by VM {}", r.hostname)));
            }
        }
        Ok(())
    }

    fn pending_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.pending_ssh_keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn op_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for and takes `hostname`'s operation lock (see [`VmOp`]).
    pub async fn lock_vm(&self, hostname: &str) -> VmOp {
        let lock = self.op_map().entry(hostname.to_string()).or_default().clone();
        VmOp {
            guard: Some(lock.lock_owned().await),
            ops: self.ops.clone(),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a VM's share of the capacity budget under `key`, or answers 503 saying what is
    /// short.
    fn reserve(&self, key: &str, rec: &VmRecord) -> Result<(), ApiErr> {
        self.ledger().reserve(key, Hold::of(rec)).map_err(ApiErr::unavailable)
    }

    /// Gives a VM's share of the capacity budget back (nothing when it holds none).
    fn release(&self, key: &str) {
        self.ledger().holds.remove(key);
    }

    /// Measures what each running VM's cgroup is charged (a counter read per VM) into the
    /// ledger, which then counts running VMs by it: idle clones of a template cost what they
    /// wrote, not their RAM. Nothing to do without cgroups or with nominal accounting.
    pub fn account_memory(&self) {
        let Some(jail) = &self.host.jail else { return };
        if !self.ledger().measured {
            return;
        }
        let names: Vec<String> = self.vms().keys().cloned().collect();
        let used: Vec<(String, Option<u64>)> = names
            .into_iter()
            .map(|n| {
                let m = jail.memory_used(&n);
                (n, m)
            })
            .collect();
        let mut l = self.ledger();
        for (n, m) in used {
            if let Some(h) = l.holds.get_mut(&n) {
                h.measured = m;
            }
        }
    }

    /// Runs [`Manager::account_memory`] every `every` while the manager lives.
    pub fn start_accounting(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(m) = me.upgrade() else { return };
                m.account_memory();
            }
        });
    }

    /// The capacity held by running and starting VMs, and the budget.
    pub fn capacity(&self) -> (Capacity, Capacity) {
        let l = self.ledger();
        (l.held(None), l.budget)
    }

    pub fn group(&self, name: &str) -> Result<&Group, ApiErr> {
        self.settings
            .groups
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| ApiErr::not_found(format!("host group {name:?} not found")))
    }

    fn vm_dir(&self, hostname: &str) -> PathBuf {
        self.host.vm_root.join(hostname)
    }

    /// Brings the records in line with reality after a start: no VM process of an earlier run
    /// is left running, ephemeral VMs are gone, persistent ones are Stopped.
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        for rec in self.db.list()? {
            if let Some(pid) = rec.pid {
                let ours = pid_is_our_qemu(pid, &rec.hostname);
                let same = rec.pid_start.is_some() && slicer_hypervisor::qemu::process_start_time(pid) == rec.pid_start;
                if ours && same && self.group(&rec.host_group).is_ok() {
                    match self.adopt(&rec, pid, rec.pid_start.unwrap_or_default()).await {
                        Ok(()) => {
                            tracing::info!("adopted VM {} (pid {pid})", rec.hostname);
                            continue;
                        }
                        Err(e) => tracing::warn!("cannot adopt VM {}: {e:#}", rec.hostname),
                    }
                }
                if ours {
                    tracing::warn!("stopping VM process {pid} of {} left by an earlier run", rec.hostname);
                    // SAFETY: plain kill(2) on a pid whose command line names this VM.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
            }
            // A QEMU the record does not name (a daemon killed between starting it and
            // recording its pid) is not adopted either: nothing may run without a record.
            for pid in qemus_named(&rec.hostname) {
                tracing::warn!(
                    "stopping unrecorded VM process {pid} of {} left by an earlier run",
                    rec.hostname
                );
                // SAFETY: plain kill(2) on a pid whose command line names this VM.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
            if rec.status == STATUS_SUSPENDED && self.vm_dir(&rec.hostname).join(slicer_vmm::SUSPEND_FILE).is_file() {
                continue; // waits for POST /vm/{h}/restore
            }
            if rec.persistent || rec.protected {
                self.db.set_status(&rec.hostname, STATUS_STOPPED, None)?;
            } else {
                let _ = std::fs::remove_dir_all(self.vm_dir(&rec.hostname));
                self.db.delete(&rec.hostname)?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts, with their disks) the `count` VMs of each host group. One that does
    /// not fit the capacity budget (VMs adopted from an earlier run may hold it) is not
    /// started, and the log says why.
    pub async fn start_count_vms(self: &Arc<Self>) -> anyhow::Result<()> {
        for g in self.settings.groups.clone() {
            for n in 1..=g.count {
                let hostname = format!("{}-{n}", g.name);
                let _op = self.lock_vm(&hostname).await;
                if self.running(&hostname).is_ok() {
                    continue; // adopted
                }
                let existing = self.db.get(&hostname)?;
                let mut rec = match &existing {
                    Some(r) => r.clone(),
                    None => {
                        let mut r = self
                            .new_record(&g, &CreateNodeRequest::default())
                            .map_err(|e| anyhow::anyhow!("host group {}: {}", g.name, e.message))?;
                        r.protected = true;
                        r.persistent = true;
                        r
                    }
                };
                if let Err(e) = self.reserve(&hostname, &rec) {
                    tracing::error!(
                        "count VM {hostname} of host group {} not started: {}",
                        g.name,
                        e.message
                    );
                    continue;
                }
                let started = match existing {
                    Some(_) => Ok(()),
                    None => self.allocate_and_record(&mut rec, Some(n)).await,
                };
                let launched = match started {
                    Ok(()) => self.launch(&rec).await.map(drop),
                    Err(e) => Err(e),
                };
                if let Err(e) = launched {
                    self.release(&hostname);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn new_record(&self, g: &Group, req: &CreateNodeRequest) -> Result<VmRecord, ApiErr> {
        let cpus = req.cpus.unwrap_or(g.cpus);
        if cpus == 0 || cpus > g.cpus {
            return Err(ApiErr::bad_request(format!(
                "cpus {cpus} is outside 1..={} allowed by host group {}",
                g.cpus, g.name
            )));
        }
        let ram_bytes = req.ram_bytes.unwrap_or(g.ram_bytes);
        if ram_bytes < 128 << 20 || ram_bytes > g.ram_bytes {
            return Err(ApiErr::bad_request(format!(
                "ram_bytes {ram_bytes} is outside 128 MiB..={} allowed by host group {}",
                g.ram_bytes, g.name
            )));
        }
        if req.gpu_count.unwrap_or(0) > 0 {
            return Err(ApiErr::bad_request("gpu_count: this host has no GPUs to pass through"));
        }
        for t in &req.tags {
            if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
                return Err(ApiErr::bad_request(format!(
                    "invalid tag {t:?}: 1-256 printable characters"
                )));
            }
        }
        if req.tags.len() > 64 {
            return Err(ApiErr::bad_request("at most 64 tags"));
        }
        if req.hostname.is_some() {
            return Err(ApiErr::bad_request("hostname: hostnames are allocated by the daemon"));
        }
        Ok(VmRecord {
            hostname: String::new(),
            host_group: g.name.clone(),
            cpus,
            ram_bytes,
            persistent: req.persistent.unwrap_or(g.persistent),
            protected: false,
            status: STATUS_RUNNING.into(),
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

    /// A per-VM network override: only in isolated groups, every entry parsed.
    fn check_override(&self, g: &Group, n: &slicer_api::NetworkOverride) -> Result<(), ApiErr> {
        if g.network_mode != "isolated" {
            return Err(ApiErr::bad_request(format!(
                "network: per-VM allow/drop lists need an isolated host group; {} is in {} mode",
                g.name, g.network_mode
            )));
        }
        for (field, list) in [("allow", &n.allow), ("drop", &n.drop)] {
            if list.as_ref().is_some_and(|l| l.len() > 256) {
                return Err(ApiErr::bad_request(format!("network.{field}: at most 256 entries")));
            }
            for e in list.iter().flatten() {
                if slicer_net::policy::parse_entry(e).is_none() {
                    return Err(ApiErr::bad_request(format!(
                        "network.{field}: {e:?} is not a CIDR, an address or address:port"
                    )));
                }
            }
        }
        Ok(())
    }

    /// `POST /hostgroup/{g}/nodes`.
    pub async fn create(
        self: &Arc<Self>,
        group: &str,
        req: CreateNodeRequest,
        wait: Option<Wait>,
        timeout: Duration,
    ) -> Result<CreateNodeResponse, ApiErr> {
        let g = self.group(group)?.clone();
        let mut rec = self.new_record(&g, &req)?;
        if let Some(n) = &req.network {
            self.check_override(&g, n)?;
            rec.net_allow = n.allow.clone();
            rec.net_drop = n.drop.clone();
        }
        if let Some(names) = &req.secrets {
            if let Some(bad) = names.iter().find(|n| !crate::secrets::valid_name(n)) {
                return Err(ApiErr::bad_request(format!("secrets: {bad:?} is not a secret name")));
            }
        }
        if req.import_user.as_deref().is_some_and(|u| !u.is_empty()) {
            return Err(ApiErr::bad_request(
                "import_user: importing keys from GitHub is not supported (the daemon does not fetch keys from the internet); pass the public keys in ssh_keys",
            ));
        }
        crate::config::check_ssh_keys("ssh_keys", &req.ssh_keys).map_err(ApiErr::bad_request)?;
        if req.tags.iter().filter(|t| t.starts_with("name=")).count() > 1 {
            return Err(ApiErr::bad_request("tags: at most one name= tag"));
        }
        if let Some(name) = vm_name(&req.tags) {
            self.check_name(name, None)?;
        }
        let me = self.clone();
        let (rec, running) =
            detached(async move { me.record_and_launch(rec, req.secrets, req.ssh_keys, None).await }).await?;
        if let Some(w) = wait {
            let waited = tokio::time::timeout(timeout, self.wait_for(&running, w)).await;
            let failure = match waited {
                Ok(Ok(())) => None,
                Ok(Err(msg)) => Some(ApiErr::internal(msg)),
                Err(_) => Some(ApiErr::timeout(format!(
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
                    let tail = userdata_log_tail(&running.vm).await;
                    return Err(ApiErr::new(
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                        format!(
                            "VM {} was created, but its userdata exited with code {code}; the VM is kept \
                             (delete it with DELETE /hostgroup/{}/nodes/{}). Last lines of {USERDATA_LOG}:\n{tail}",
                            rec.hostname, rec.host_group, rec.hostname
                        ),
                    ));
                }
            }
        }
        Ok(created(&rec))
    }

    /// The part of a create that runs to its end: takes the VM's share of the capacity budget
    /// (before anything exists), records the VM and starts it under its operation lock.
    async fn record_and_launch(
        self: &Arc<Self>,
        mut rec: VmRecord,
        secrets: Option<Vec<String>>,
        ssh_keys: Vec<String>,
        fork: Option<commits::ForkFrom>,
    ) -> Result<(VmRecord, Arc<Running>), ApiErr> {
        let claim = format!("#new-{}", self.claims.fetch_add(1, Ordering::Relaxed));
        self.reserve(&claim, &rec)?;
        if let Err(e) = self.allocate_and_record(&mut rec, None).await {
            self.release(&claim);
            return Err(match e.downcast::<ApiErr>() {
                Ok(api) => api,
                Err(e) => ApiErr::internal(e),
            });
        }
        let hostname = rec.hostname.clone();
        {
            let mut ledger = self.ledger();
            if let Some(h) = ledger.holds.remove(&claim) {
                ledger.holds.insert(hostname.clone(), h);
            }
        }
        let _op = self.lock_vm(&hostname).await;
        // A delete may have come first: it removed the record and released the share.
        match self.db.get(&hostname) {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.release(&hostname);
                return Err(ApiErr::conflict(format!(
                    "VM {hostname} was deleted while it was being created"
                )));
            }
            Err(e) => {
                self.abandon(&hostname);
                return Err(ApiErr::internal(e));
            }
        }
        let scoped = match &secrets {
            Some(names) => self.db.set_secret_scope(&hostname, names).map_err(ApiErr::internal),
            None => Ok(()),
        };
        if !ssh_keys.is_empty() {
            self.pending_keys().insert(hostname.clone(), ssh_keys);
        }
        let prepared = match (scoped, &fork) {
            (Ok(()), Some(f)) => self.prepare_fork(&rec, f).await,
            (r, _) => r,
        };
        let launched = match prepared {
            Ok(()) => self.launch(&rec).await.map_err(ApiErr::internal),
            Err(e) => Err(e),
        };
        match launched {
            Ok(r) => Ok((rec, r)),
            Err(e) => {
                self.pending_keys().remove(&hostname);
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

    /// Whether new VMs of `group` start from a template.
    fn warm(&self, group: &str) -> bool {
        self.group(group).is_ok_and(|g| g.warm_start)
    }

    /// The template shapes of the host groups that start warm.
    pub fn template_shapes(&self) -> Vec<Shape> {
        let mut shapes: Vec<Shape> = Vec::new();
        for g in self.settings.groups.iter().filter(|g| g.warm_start) {
            let s = Shape {
                image: g.image.clone(),
                cpus: g.cpus,
                memory_mib: (g.ram_bytes >> 20) as u32,
                nic: self.nets.contains_key(&g.name),
            };
            if !shapes.contains(&s) {
                shapes.push(s);
            }
        }
        shapes
    }

    /// Builds (or loads) the templates of warm-starting groups, so the first creates find them.
    pub async fn prepare_templates(&self) {
        for shape in self.template_shapes() {
            if let Err(e) = self.host.template(&shape).await {
                tracing::warn!("no template for {shape:?}; VMs of that shape boot cold: {e:#}");
            }
        }
    }

    /// A new VM from its group's template, ready (agent answering, identity applied). `None`
    /// (with the reason logged) when that is not possible: the caller boots it cold.
    async fn start_warm(&self, spec: &VmSpec) -> Option<Vm> {
        let shape = Shape::of(spec);
        let template = match self.host.template(&shape).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("VM {}: booting cold, no template: {e:#}", spec.name);
                return None;
            }
        };
        match self.restore_ready(spec, &template).await {
            Ok(vm) => Some(vm),
            Err(e) => {
                tracing::warn!("VM {}: booting cold, restore failed: {e:#}", spec.name);
                None
            }
        }
    }

    /// A VM restored from `template` (a group's template, or a live commit's capture) and
    /// ready; on failure nothing of it is left.
    async fn restore_ready(&self, spec: &VmSpec, template: &slicer_vmm::Template) -> anyhow::Result<Vm> {
        let vm = Vm::restore(&self.host, spec, template).await?;
        if let Err(e) = vm.wait_ready(RESTORE_TIMEOUT).await {
            vm.discard().await;
            return Err(e);
        }
        Ok(vm)
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
            Some(capture) => self.restore_ready(&spec, &capture).await,
            None => {
                let warm = match fresh && self.warm(&rec.host_group) {
                    true => self.start_warm(&spec).await,
                    false => None,
                };
                match warm {
                    Some(vm) => Ok(vm),
                    None => Vm::start(&self.host, &spec).await,
                }
            }
        };
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(n) = &net {
                    n.teardown().await;
                }
                self.count_launch(&rec.host_group, None);
                return Err(e);
            }
        };
        self.count_launch(&rec.host_group, Some(vm.start_mode));
        self.db
            .set_status(&rec.hostname, STATUS_RUNNING, vm.start_time().map(|t| (vm.pid(), t)))?;
        Ok(self.track(rec, vm, net, false))
    }

    /// Takes over a VM still running from an earlier daemon (same pid and start time).
    async fn adopt(self: &Arc<Self>, rec: &VmRecord, pid: u32, start: u64) -> anyhow::Result<()> {
        let vm = Vm::adopt(&self.host, &self.spec(rec), pid, start).await?;
        let net = self.net_handle(rec);
        let paused = rec.status == slicer_api::STATUS_PAUSED;
        // Its share of the capacity budget, even if that is over budget now (before its exit
        // watcher may give it back).
        self.ledger().holds.insert(rec.hostname.clone(), Hold::of(rec));
        self.track(rec, vm, net, paused);
        Ok(())
    }

    /// The host-side network objects a VM has (for an adopted VM: they already exist).
    fn net_handle(&self, rec: &VmRecord) -> Option<NetHandle> {
        let ip: std::net::Ipv4Addr = rec.ip.split('/').next()?.parse().ok()?;
        match self.nets.get(&rec.host_group)? {
            GroupNet::Isolated(_) => {
                let (allow, drop) = self.effective_policy(rec);
                let subnet = slicer_net::Net { addr: ip, prefix: 30 }.normalized();
                Some(NetHandle::Isolated(slicer_net::Isolated::new(
                    &rec.hostname,
                    subnet,
                    allow,
                    drop,
                )))
            }
            GroupNet::Bridge(b) => {
                let g = self.group(&rec.host_group).ok()?;
                Some(NetHandle::Tap(format!(
                    "{}{}",
                    g.tap_prefix,
                    u32::from(ip) - u32::from(b.subnet.addr)
                )))
            }
        }
    }

    /// Whether `hostname` may have secret `name`.
    fn secret_allowed(&self, hostname: &str, name: &str) -> bool {
        match self.db.secret_scope(hostname) {
            Ok(Some(names)) => names.iter().any(|n| n == name),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Copies one secret into a guest (mode and owner as stored).
    async fn push_secret(vm: &Vm, info: &crate::secrets::SecretInfo, value: Vec<u8>) -> anyhow::Result<()> {
        let agent = vm.agent();
        // A recursive mkdir of an existing directory succeeds.
        agent
            .mkdir(&slicer_agent_proto::MkdirRequest {
                path: crate::secrets::GUEST_DIR.into(),
                recursive: true,
                mode: Some("0711".into()),
            })
            .await?;
        agent
            .upload_file(
                &format!("{}/{}", crate::secrets::GUEST_DIR, info.name),
                Some(info.mode()),
                Some((info.uid, Some(info.gid))),
                std::io::Cursor::new(value),
            )
            .await?;
        Ok(())
    }

    /// Makes the guest's copy of secret `name` what the store holds now: its value, or none
    /// when the secret is gone or the VM may not have it.
    async fn apply_secret(&self, hostname: &str, vm: &Vm, name: &str) -> anyhow::Result<()> {
        let info = match self.secret_allowed(hostname, name) {
            true => self.secrets.info(name)?,
            false => None,
        };
        match info {
            Some(info) => Self::push_secret(vm, &info, self.secrets.value(name)?).await,
            None => vm
                .agent()
                .remove(&format!("{}/{name}", crate::secrets::GUEST_DIR), false)
                .await
                .or_else(|e| if e.is_not_found() { Ok(()) } else { Err(e) })
                .map_err(anyhow::Error::from),
        }
    }

    /// Makes a guest's secrets match the store: every secret it may have, current; with
    /// `prune`, also none it should no longer have (after a pause or a suspend). Runs in the
    /// VM's secret queue, each step bounded by [`SECRET_PUSH_TIMEOUT`].
    async fn sync_secrets(&self, hostname: &str, r: &Running, prune: bool) -> anyhow::Result<()> {
        let _turn = r.secrets_turn.lock().await;
        let mut names: Vec<String> = self
            .secrets
            .list()?
            .into_iter()
            .map(|i| i.name)
            .filter(|n| self.secret_allowed(hostname, n))
            .collect();
        if prune {
            let listed = tokio::time::timeout(SECRET_PUSH_TIMEOUT, r.vm.agent().readdir(crate::secrets::GUEST_DIR))
                .await
                .context("the guest did not list its secrets in time")?;
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
            tokio::time::timeout(SECRET_PUSH_TIMEOUT, self.apply_secret(hostname, &r.vm, &name))
                .await
                .with_context(|| format!("secret {name}: the guest did not answer within {SECRET_PUSH_TIMEOUT:?}"))??;
        }
        Ok(())
    }

    /// A full secret sync of a VM, in the background.
    fn resync_secrets(self: &Arc<Self>, hostname: &str, r: &Arc<Running>) {
        let (me, h, r) = (self.clone(), hostname.to_string(), r.clone());
        tokio::spawn(async move {
            if let Err(e) = me.sync_secrets(&h, &r, true).await {
                tracing::warn!("VM {h}: syncing secrets: {e:#}");
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
                match tokio::time::timeout(SECRET_PUSH_TIMEOUT, me.apply_secret(&hostname, &r.vm, &name)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("VM {hostname}: updating secret {name}: {e:#}"),
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
        let (held, budget) = self.capacity();
        self.metrics.set_capacity(&held, &budget);
        self.metrics.encode()
    }

    /// Registers a started or adopted VM and the tasks that follow its boot and its exit.
    fn track(self: &Arc<Self>, rec: &VmRecord, vm: Vm, net: Option<NetHandle>, paused: bool) -> Arc<Running> {
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
        tokio::spawn(async move {
            // Taken whatever happens, so that a VM that never boots leaves nothing behind.
            let request_keys = me.pending_keys().remove(&hostname).unwrap_or_default();
            let result = if r.paused.load(Ordering::SeqCst) || r.vm.is_ready() {
                Ok(())
            } else {
                r.vm.wait_ready(BOOT_TIMEOUT).await.map_err(|e| format!("{e:#}"))
            };
            let ok = result.is_ok();
            if ok && r.vm.is_ready() && r.vm.start_mode != slicer_vmm::StartMode::Adopted {
                me.metrics
                    .ready_seconds
                    .get_or_create(&crate::metrics::ModeLabels {
                        mode: r.vm.start_mode.as_str().to_string(),
                    })
                    .observe(r.vm.boot_time().as_secs_f64());
            }
            if ok && r.vm.start_mode != slicer_vmm::StartMode::Adopted {
                // Before userdata, so that it can use them.
                let prune = r.vm.start_mode == slicer_vmm::StartMode::Resume;
                if let Err(e) = me.sync_secrets(&hostname, &r, prune).await {
                    tracing::warn!("VM {hostname}: syncing secrets: {e:#}");
                }
                let mut keys = me.settings.ssh_keys.clone();
                keys.extend(request_keys);
                if !keys.is_empty() {
                    if let Err(e) = authorize_ssh_keys(&r.vm, &keys).await {
                        tracing::warn!("VM {hostname}: installing SSH keys: {e:#}");
                    }
                }
            }
            let _ = ready_tx.send(Some(result));
            if let (true, Some(script)) = (ok, userdata) {
                let code = run_userdata(&r.vm, &script).await;
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
                let _ = self.db.set_status(hostname, STATUS_STOPPED, None);
            }
            Ok(Some(_)) => {
                let _ = std::fs::remove_dir_all(self.vm_dir(hostname));
                let _ = self.db.delete(hostname);
            }
            _ => {}
        }
    }

    pub fn record(&self, hostname: &str) -> Result<VmRecord, ApiErr> {
        self.db
            .get(hostname)
            .map_err(ApiErr::internal)?
            .ok_or_else(|| ApiErr::not_found(format!("VM {hostname:?} not found")))
    }

    pub fn node(&self, rec: &VmRecord) -> Node {
        let status = match self.vms().get(&rec.hostname) {
            Some(r) if r.vm.is_running() && r.paused.load(Ordering::SeqCst) => slicer_api::STATUS_PAUSED,
            Some(r) if r.vm.is_running() => STATUS_RUNNING,
            _ if rec.status == STATUS_SUSPENDED => STATUS_SUSPENDED,
            _ => STATUS_STOPPED,
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
            status: status.into(),
            persistent: rec.persistent,
        }
    }

    pub fn list(&self, group: Option<&str>) -> Result<Vec<Node>, ApiErr> {
        let recs = self.db.list().map_err(ApiErr::internal)?;
        Ok(recs
            .iter()
            .filter(|r| group.is_none_or(|g| r.host_group == g))
            .map(|r| self.node(r))
            .collect())
    }

    /// The running VM of `hostname`: 404 if unknown, 409 if it is not running.
    pub fn running(&self, hostname: &str) -> Result<Arc<Running>, ApiErr> {
        if let Some(r) = self.vms().get(hostname) {
            if r.vm.is_running() {
                return Ok(r.clone());
            }
        }
        self.record(hostname)?;
        Err(ApiErr::conflict(format!("VM {hostname} is not running")))
    }

    /// The running, unpaused VM of `hostname`, for guest operations: 409 when paused.
    pub fn active(&self, hostname: &str) -> Result<Arc<Running>, ApiErr> {
        let r = self.running(hostname)?;
        if r.paused.load(Ordering::SeqCst) {
            return Err(ApiErr::conflict(format!("VM {hostname} is paused: resume it first")));
        }
        Ok(r)
    }

    /// `POST /vm/{h}/pause` and `/resume`: QMP stop and cont. A resumed VM gets its secrets
    /// again: changes made while it was paused passed it by.
    pub async fn set_paused(self: &Arc<Self>, hostname: &str, pause: bool) -> Result<(), ApiErr> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move {
            let _op = me.lock_vm(&h).await;
            let r = me.running(&h)?;
            let qmp = r.vm.qmp().await.map_err(ApiErr::internal)?;
            qmp.execute(if pause { "stop" } else { "cont" }, None)
                .await
                .map_err(ApiErr::internal)?;
            let was_paused = r.paused.swap(pause, Ordering::SeqCst);
            let status = if pause {
                slicer_api::STATUS_PAUSED
            } else {
                STATUS_RUNNING
            };
            me.db
                .set_status(&h, status, r.vm.start_time().map(|t| (r.vm.pid(), t)))
                .map_err(ApiErr::internal)?;
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
    pub async fn suspend(self: &Arc<Self>, hostname: &str) -> Result<(), ApiErr> {
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
                return Err(ApiErr::internal(e));
            }
            me.forget(&h, &r);
            if let Some(n) = &r.net {
                n.teardown().await;
            }
            me.release(&h);
            me.db.set_status(&h, STATUS_SUSPENDED, None).map_err(ApiErr::internal)?;
            Ok(())
        })
        .await
    }

    /// `POST /vm/{h}/restore`: continues a suspended VM where it was, with its network set up
    /// again; with `wait`, answers once its agent does (or after `timeout`).
    pub async fn restore(self: &Arc<Self>, hostname: &str, wait: bool, timeout: Duration) -> Result<(), ApiErr> {
        let (me, h) = (self.clone(), hostname.to_string());
        let r = detached(async move { me.restore_locked(&h).await }).await?;
        if wait {
            match tokio::time::timeout(timeout, self.wait_for(&r, Wait::Agent)).await {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => return Err(ApiErr::internal(msg)),
                Err(_) => {
                    return Err(ApiErr::timeout(format!(
                        "VM {hostname} did not answer within {timeout:?} of its restore"
                    )))
                }
            }
        }
        Ok(())
    }

    /// [`Manager::restore`] up to the start of QEMU, under the VM's operation lock.
    async fn restore_locked(self: &Arc<Self>, hostname: &str) -> Result<Arc<Running>, ApiErr> {
        let _op = self.lock_vm(hostname).await;
        let rec = self.record(hostname)?;
        if self.running(hostname).is_ok() {
            return Err(ApiErr::conflict(format!("VM {hostname} is running")));
        }
        if rec.status != STATUS_SUSPENDED {
            return Err(ApiErr::conflict(format!(
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
    async fn resume_vm(self: &Arc<Self>, rec: &VmRecord) -> Result<Arc<Running>, ApiErr> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(ApiErr::unavailable("the daemon is stopping"));
        }
        let mut spec = self.spec(rec);
        let net = match self.setup_net(rec).await.map_err(ApiErr::internal)? {
            Some((h, n)) => {
                spec.net = Some(n);
                Some(h)
            }
            None => None,
        };
        let recorded = match Vm::resume(&self.host, &spec).await {
            Ok(vm) => self
                .db
                .set_status(&rec.hostname, STATUS_RUNNING, vm.start_time().map(|t| (vm.pid(), t)))
                .map(|()| vm),
            Err(e) => Err(e),
        };
        let vm = match recorded {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(n) = &net {
                    n.teardown().await;
                }
                return Err(ApiErr::internal(e));
            }
        };
        self.count_launch(&rec.host_group, Some(vm.start_mode));
        Ok(self.track(rec, vm, net, false))
    }

    /// How the running VM started (`cold`, `template`, `resume`, `adopted`).
    pub fn start_mode(&self, hostname: &str) -> Option<&'static str> {
        self.vms().get(hostname).map(|r| r.vm.start_mode.as_str())
    }

    /// `POST /vm/{h}/relaunch`: boots a stopped persistent VM again from its disk. Of two at
    /// once, the second finds it running (409).
    pub async fn relaunch(self: &Arc<Self>, hostname: &str) -> Result<CreateNodeResponse, ApiErr> {
        let (me, h) = (self.clone(), hostname.to_string());
        let (rec, r) = detached(async move {
            let _op = me.lock_vm(&h).await;
            let rec = me.record(&h)?;
            if me.running(&h).is_ok() {
                return Err(ApiErr::conflict(format!("VM {h} is running")));
            }
            if rec.status == STATUS_SUSPENDED {
                return Err(ApiErr::conflict(format!(
                    "VM {h} is suspended: restore it (POST /vm/{h}/restore) or delete it"
                )));
            }
            if !rec.persistent && !rec.protected {
                return Err(ApiErr::bad_request(format!("VM {h} is not persistent")));
            }
            me.reap_exited(&h).await;
            me.reserve(&h, &rec)?;
            match me.launch(&rec).await {
                Ok(r) => Ok((rec, r)),
                Err(e) => {
                    me.release(&h);
                    Err(ApiErr::internal(e))
                }
            }
        })
        .await?;
        self.wait_for(&r, Wait::Agent).await.map_err(ApiErr::internal)?;
        Ok(created(&rec))
    }

    /// Stops and removes a VM with its disk. `force` skips the protection of count VMs. Waits
    /// for an operation in progress on the VM (a launch) and then removes what it made.
    pub async fn delete(self: &Arc<Self>, hostname: &str, force: bool) -> Result<DeleteResponse, ApiErr> {
        let (me, h) = (self.clone(), hostname.to_string());
        detached(async move { me.delete_locked(&h, force).await }).await
    }

    async fn delete_locked(&self, hostname: &str, force: bool) -> Result<DeleteResponse, ApiErr> {
        let _op = self.lock_vm(hostname).await;
        let rec = self.record(hostname)?;
        if rec.protected && !force {
            return Err(ApiErr::forbidden(format!(
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
        self.db.delete(hostname).map_err(ApiErr::internal)?;
        Ok(DeleteResponse {
            message: "VM deleted successfully".into(),
            disk_removed: disk_removed.to_string(),
            error: String::new(),
        })
    }

    /// `POST /vm/{h}/shutdown`: power off (ephemeral VMs are then removed) or reboot. A reboot
    /// keeps the VM's share of the capacity budget.
    pub async fn shutdown(self: &Arc<Self>, hostname: &str, reboot: bool) -> Result<(), ApiErr> {
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
                Ok(rec) => me.launch(&rec).await.map(drop).map_err(ApiErr::internal),
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

/// Adds `keys` (checked by `config::check_ssh_keys`) to the default user's
/// ~/.ssh/authorized_keys, keeping the lines already there: a restart re-adds the config's
/// keys without duplicating them, and keys the user added stay. It runs as that user (the
/// agent resolves who that is), so what it makes is theirs.
async fn authorize_ssh_keys(vm: &Vm, keys: &[String]) -> anyhow::Result<()> {
    let script = r#"set -e; umask 077; mkdir -p "$HOME/.ssh"; f="$HOME/.ssh/authorized_keys"; touch "$f"
while IFS= read -r k; do grep -qxF -- "$k" "$f" || printf '%s\n' "$k" >> "$f"; done"#;
    let mut input = keys.join("\n");
    input.push('\n');
    let req = ExecRequest {
        uid: Some(slicer_agent_proto::DEFAULT_USER),
        ..ExecRequest::argv(["/bin/sh", "-c", script])
    };
    let out = vm.agent().exec_output(&req, Some(input.into())).await?;
    anyhow::ensure!(
        out.status.code == Some(0),
        "exit {:?}: {}",
        out.status.code,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The VM's name: the value of its `name=` tag.
pub fn vm_name(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix("name="))
}

const USERDATA_LOG: &str = "/var/log/slicer-userdata.log";

/// Runs userdata as root, once per disk: /etc/slicer/userdata-ran holds its exit code, and a
/// disk that has it (a restarted, committed or forked VM) reports that code without running it
/// again. `TARGET_USER` names the image's default user, as on SlicerVM.
async fn run_userdata(vm: &Vm, script: &str) -> i32 {
    let agent = vm.agent();
    let path = "/etc/slicer/userdata.sh";
    let guard = "/etc/slicer/userdata-ran";
    let cmd = format!(
        "if [ -e {guard} ]; then read rc < {guard}; case \"$rc\" in ''|*[!0-9]*) rc=0;; esac; exit $rc; fi; \
         {path} > {USERDATA_LOG} 2>&1; rc=$?; echo $rc > {guard}; exit $rc"
    );
    // The default user's name, as the agent resolves it for requests without a uid.
    let whoami = ExecRequest {
        uid: Some(slicer_agent_proto::DEFAULT_USER),
        ..ExecRequest::argv(["id", "-un"])
    };
    let target_user = match agent.exec_output(&whoami, None).await {
        Ok(out) if out.status.code == Some(0) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "root".to_string(),
    };
    if let Err(e) = agent
        .upload_file(
            path,
            Some(0o700),
            None,
            std::io::Cursor::new(script.as_bytes().to_vec()),
        )
        .await
    {
        tracing::warn!("uploading userdata to {}: {e}", vm.name);
        return -1;
    }
    let run = ExecRequest {
        env: vec![("TARGET_USER".into(), target_user)],
        ..ExecRequest::argv(["/bin/sh", "-c", &cmd])
    };
    match agent.exec_output(&run, None).await {
        Ok(out) => out.status.shell_code(),
        Err(e) => {
            tracing::warn!("running userdata in {}: {e}", vm.name);
            -1
        }
    }
}

/// The last lines of the userdata log (at most 4 KiB of it), for an error message.
async fn userdata_log_tail(vm: &Vm) -> String {
    let req = ExecRequest::argv(["tail", "-c", "4096", USERDATA_LOG]);
    match vm.agent().exec_output(&req, None).await {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().rev().take(20).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
        Err(e) => format!("(could not read it: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ram_mib: u64, cpus: u32) -> VmRecord {
        VmRecord {
            hostname: String::new(),
            host_group: "g".into(),
            cpus,
            ram_bytes: ram_mib << 20,
            persistent: false,
            protected: false,
            status: STATUS_RUNNING.into(),
            created_at: String::new(),
            ip: String::new(),
            pid: None,
            image: "min".into(),
            storage_size: None,
            userdata: None,
            userdata_ran: false,
            userdata_exit_code: None,
            tags: Vec::new(),
            net_allow: None,
            net_drop: None,
            pid_start: None,
        }
    }

    #[test]
    fn the_ledger_refuses_what_does_not_fit_and_says_what_is_short() {
        let overhead = slicer_vmm::vm_overhead_bytes(256 << 20);
        let mut l = Ledger::new(
            Capacity {
                ram_bytes: 2 * ((256 << 20) + overhead),
                vms: 3,
                vcpus: 4,
            },
            true,
        );
        l.reserve("a", Hold::of(&rec(256, 1))).unwrap();
        l.reserve("b", Hold::of(&rec(256, 1))).unwrap();
        let e = l.reserve("c", Hold::of(&rec(256, 1))).unwrap_err();
        assert!(
            e.starts_with("host capacity: ") && e.contains("of RAM requested") && e.contains("0 MiB free"),
            "{e}"
        );
        // Taking again what one holds is no second share.
        l.reserve("a", Hold::of(&rec(256, 1))).unwrap();
        assert_eq!(l.held(None).vms, 2);
        l.holds.remove("b");
        let e = l.reserve("c", Hold::of(&rec(128, 4))).unwrap_err();
        assert!(e.contains("4 vCPUs requested, 3 free of a budget of 4"), "{e}");
        l.reserve("c", Hold::of(&rec(128, 3))).unwrap();
        l.budget.vms = 2;
        let e = l.reserve("d", Hold::of(&rec(128, 0))).unwrap_err();
        assert!(e.contains("2 VMs are running or starting, the budget is 2"), "{e}");
        assert_eq!(
            l.held(None),
            Capacity {
                ram_bytes: (384 << 20) + 2 * overhead,
                vms: 2,
                vcpus: 4
            }
        );
    }

    #[test]
    fn measured_vms_count_what_they_use_and_never_more_than_their_limit() {
        let overhead = slicer_vmm::vm_overhead_bytes(256 << 20);
        let nominal = (256 << 20) + overhead;
        let budget = Capacity {
            ram_bytes: 3 * nominal,
            vms: 100,
            vcpus: 100,
        };
        for measured in [true, false] {
            let mut l = Ledger::new(budget, measured);
            for k in ["a", "b", "c"] {
                l.reserve(k, Hold::of(&rec(256, 1))).unwrap();
            }
            assert!(l.reserve("d", Hold::of(&rec(256, 1))).is_err());
            // Idle clones: 40 MiB each; one that grew past its cgroup's limit counts its limit.
            for (k, m) in [("a", 40 << 20), ("b", 40 << 20), ("c", 10 * nominal)] {
                l.holds.get_mut(k).unwrap().measured = Some(m);
            }
            let held = l.held(None).ram_bytes;
            if measured {
                assert_eq!(held, (80 << 20) + nominal);
                l.reserve("d", Hold::of(&rec(256, 1))).unwrap();
            } else {
                assert_eq!(held, 3 * nominal);
                assert!(l.reserve("d", Hold::of(&rec(256, 1))).is_err());
            }
        }
    }

    #[tokio::test]
    async fn operation_locks_serialise_and_go_when_unused() {
        let ops = OpMap::default();
        let lock = |h: &str| {
            let l = ops.lock().unwrap().entry(h.to_string()).or_default().clone();
            let ops = ops.clone();
            async move {
                VmOp {
                    guard: Some(l.lock_owned().await),
                    ops,
                }
            }
        };
        let first = lock("vm-1").await;
        let waiting = tokio::spawn(lock("vm-1"));
        let other = lock("vm-2").await;
        // The waiter runs (on this single-threaded runtime) whenever the test yields.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "a second operation on vm-1 waits");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ops.lock().unwrap().len(), 2);
        drop(second);
        drop(other);
        assert!(ops.lock().unwrap().is_empty(), "unused locks are removed");
    }
}
