//! What the manager tells about VMs: records, running VMs and their domain views.

use super::*;

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
    pub async fn accelerator(&self, image: &str) -> anyhow::Result<slicer_hypervisor::Accel> {
        let kernel = self.host.images.get(image)?.kernel;
        Ok(self.host.accel(&kernel).await?)
    }

    /// Where a VM's serial console is logged (rotated to `console.log.1`).
    pub fn console_log(&self, hostname: &str) -> PathBuf {
        self.vm_dir(hostname).join("console.log")
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

    /// How the running VM started.
    pub fn start_mode(&self, hostname: &str) -> Option<slicer_api::StartMode> {
        self.vms().get(hostname).map(|r| match r.vm.start_mode() {
            slicer_vmm::StartMode::Cold => slicer_api::StartMode::Cold,
            slicer_vmm::StartMode::Template => slicer_api::StartMode::Template,
            slicer_vmm::StartMode::Resume => slicer_api::StartMode::Resume,
            slicer_vmm::StartMode::Adopted => slicer_api::StartMode::Adopted,
        })
    }
}
