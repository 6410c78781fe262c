//! What the manager tells about VMs: records, running VMs and their domain views.

use std::net::Ipv4Addr;

use super::*;

/// A VM's address on its host group's network, with its subnet's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmAddr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl VmAddr {
    /// The address of `rec` (its record keeps `addr/prefix`, or nothing when the VM has no
    /// network).
    pub fn of(rec: &VmRecord) -> Option<VmAddr> {
        let (addr, prefix) = rec.ip.split_once('/')?;
        Some(VmAddr {
            addr: addr.parse().ok()?,
            prefix: prefix.parse().ok()?,
        })
    }
}

impl std::fmt::Display for VmAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A VM as the manager tells of it: its record and its state now.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    pub hostname: String,
    pub group: String,
    /// `None`: the VM has no network.
    pub ip: Option<VmAddr>,
    pub ram_bytes: u64,
    pub cpus: u32,
    /// When it was created, as its record keeps it (RFC 3339, UTC).
    pub created_at: String,
    pub tags: Vec<String>,
    pub status: VmStatus,
    pub persistent: bool,
}

/// A VM a create (or relaunch) started.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub hostname: String,
    pub group: String,
    /// `None`: the VM has no network.
    pub ip: Option<VmAddr>,
    /// When it was created, as its record keeps it (RFC 3339, UTC).
    pub created_at: String,
    pub persistent: bool,
}

impl Created {
    /// The VM of `rec`, as created.
    pub(super) fn of(rec: &VmRecord) -> Created {
        Created {
            hostname: rec.hostname.clone(),
            group: rec.host_group.clone(),
            ip: VmAddr::of(rec),
            created_at: rec.created_at.clone(),
            persistent: rec.persistent,
        }
    }
}

/// What a delete removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// The VM's directory (its disk) is gone; `false`: it could not be removed (logged).
    pub disk_removed: bool,
}

impl Manager {
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
    pub async fn accelerator(&self, image: &str) -> Result<slicer_hypervisor::Accel, Error> {
        let kernel = self.host.images.get(image).map_err(Error::host)?.kernel;
        self.host.accel(&kernel).await.map_err(Error::host)
    }

    /// Where a VM's serial console is logged (rotated to `console.log.1`).
    pub fn console_log(&self, hostname: &str) -> PathBuf {
        self.vm_dir(hostname).join("console.log")
    }

    /// The record of VM `hostname`.
    pub fn record(&self, hostname: &str) -> Result<VmRecord, Error> {
        self.db
            .get(hostname)
            .map_err(Error::host)?
            .ok_or_else(|| Error::not_found(format!("VM {hostname:?} not found")))
    }

    /// What the VM of `rec` is now: its record and whether it runs (paused or not).
    pub fn vm_info(&self, rec: &VmRecord) -> VmInfo {
        let status = match self.vms().get(&rec.hostname) {
            Some(r) if r.vm.is_running() && r.paused.load(Ordering::SeqCst) => VmStatus::Paused,
            Some(r) if r.vm.is_running() => VmStatus::Running,
            _ if rec.status == VmStatus::Suspended => VmStatus::Suspended,
            _ => VmStatus::Stopped,
        };
        VmInfo {
            hostname: rec.hostname.clone(),
            group: rec.host_group.clone(),
            ip: VmAddr::of(rec),
            ram_bytes: rec.ram_bytes,
            cpus: rec.cpus,
            created_at: rec.created_at.clone(),
            tags: rec.tags.clone(),
            status,
            persistent: rec.persistent,
        }
    }

    /// Every VM (of `group`, if given), as [`Manager::vm_info`] tells it.
    pub fn list(&self, group: Option<&str>) -> Result<Vec<VmInfo>, Error> {
        let recs = self.db.list().map_err(Error::host)?;
        Ok(recs
            .iter()
            .filter(|r| group.is_none_or(|g| r.host_group == g))
            .map(|r| self.vm_info(r))
            .collect())
    }

    /// The running VM of `hostname`: not found if unknown, a conflict if it is not running.
    pub fn running(&self, hostname: &str) -> Result<Arc<Running>, Error> {
        if let Some(r) = self.vms().get(hostname) {
            if r.vm.is_running() {
                return Ok(r.clone());
            }
        }
        self.record(hostname)?;
        Err(Error::conflict(format!("VM {hostname} is not running")))
    }

    /// The running, unpaused VM of `hostname`, for guest operations: a conflict when paused.
    pub fn active(&self, hostname: &str) -> Result<Arc<Running>, Error> {
        let r = self.running(hostname)?;
        if r.paused.load(Ordering::SeqCst) {
            return Err(Error::conflict(format!("VM {hostname} is paused: resume it first")));
        }
        Ok(r)
    }

    /// How the running VM started.
    pub fn start_mode(&self, hostname: &str) -> Option<slicer_vmm::StartMode> {
        self.vms().get(hostname).map(|r| r.vm.start_mode())
    }
}
